"""URLs of the example project: the Django admin and celery_guard's metrics endpoint."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("celery-guard/", include("celery_guard.urls")),
]
