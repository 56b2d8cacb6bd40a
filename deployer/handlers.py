"""Django's error answers (400, 403, 404, 500): JSON under /api/, where
scripts read them, and the usual pages elsewhere.

DRF answers the errors raised inside an API view; these cover the rest: a
path no view matches, a body over DATA_UPLOAD_MAX_MEMORY_SIZE (refused before
the view reads it), and anything that escapes a view."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views import defaults

API = "/api/"


def _api(request) -> bool:
    return request.path.startswith(API) or request.path == API.rstrip("/")


def too_big() -> str:
    return f"the body is larger than the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE)"


def bad_request(request, exception=None):
    if not _api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return JsonResponse({"error": too_big()}, status=413)
    return JsonResponse({"error": "bad request"}, status=400)


def permission_denied(request, exception=None):
    if not _api(request):
        return defaults.permission_denied(request, exception)
    return JsonResponse({"error": "not allowed"}, status=403)


def page_not_found(request, exception=None):
    if not _api(request):
        return defaults.page_not_found(request, exception)
    return JsonResponse({"error": "there is no such API path; the API's paths are listed in the README"}, status=404)


def server_error(request):
    if not _api(request):
        return defaults.server_error(request)
    # the cause is in the server's log, never in the answer
    return JsonResponse({"error": "the server failed to answer; the error is logged"}, status=500)
