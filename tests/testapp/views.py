"""Views of the observability tests: a request that enqueues guarded tasks."""

from django.http import HttpRequest, JsonResponse

from tests.testapp.obs_tasks import obs_parent_job


def enqueue(request: HttpRequest) -> JsonResponse:
    """Enqueue ``obs_parent_job(label)`` and answer with its task id."""
    result = obs_parent_job.delay(request.GET.get("label", "web"))
    return JsonResponse({"task_id": result.id})
