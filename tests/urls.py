"""URLs of the test suite: the example project's, plus views the tests call."""

from django.urls import path

from proj.urls import urlpatterns as project_urls
from tests.testapp import views

urlpatterns = [*project_urls, path("test/enqueue", views.enqueue)]
