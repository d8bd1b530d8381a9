"""URLs of the test settings: the Django admin, celery_guard's metrics, views the tests call."""

from django.contrib import admin
from django.urls import include, path

from tests.testapp import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("celery-guard/", include("celery_guard.urls")),
    path("test/enqueue", views.enqueue),
]
