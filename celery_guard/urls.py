"""URLs of celery_guard: ``path("celery-guard/", include("celery_guard.urls"))``."""

from django.urls import path

from celery_guard.observability.views import metrics_view

app_name = "celery_guard"

urlpatterns = [path("metrics", metrics_view, name="metrics")]
