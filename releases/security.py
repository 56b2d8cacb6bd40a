"""The web's defences that are not a page: the sign-in lockout's answer and
audit, and no caching of anything a signed-in person sees."""

from __future__ import annotations

from urllib.parse import urlsplit

from axes.signals import user_locked_out
from django.conf import settings
from django.dispatch import receiver
from django.shortcuts import resolve_url
from django.http import JsonResponse
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin
from django.utils.http import urlencode
from django_htmx.http import HttpResponseClientRedirect

from . import audit


def _wants_json(request) -> bool:
    return (request.path.startswith("/api/") or "application/json" in request.headers.get("Accept", "")
            or request.headers.get("X-Requested-With") == "XMLHttpRequest")


def lockout_response(request, *args, **kwargs):
    """AXES_LOCKOUT_CALLABLE: a page that says what happened, or JSON for a script.

    axes calls this with (request, response, credentials) from a sync request and
    (request, credentials) from an async one, so only the request is used.
    """
    minutes = round(settings.AXES_COOLOFF_TIME * 60) if settings.AXES_COOLOFF_TIME else None
    message = (f"Too many failed sign-ins. Try again in {minutes} minutes, or ask an administrator to unlock you."
               if minutes else "Too many failed sign-ins. Ask an administrator to unlock you.")
    if _wants_json(request):
        response = JsonResponse({"error": message, "locked_out": True}, status=429)
    else:
        response = render(request, "registration/locked_out.html", {"message": message}, status=429)
    if minutes:
        response["Retry-After"] = str(minutes * 60)
    return response


@receiver(user_locked_out, dispatch_uid="greenlight-audit-lockout")
def audit_lockout(sender, request, username, ip_address, **kwargs):
    # axes signals every refused attempt while locked out; the audit keeps the
    # one that locked (the count restarts once the cool-off has passed).
    failures = getattr(request, "axes_failures_since_start", None)
    if failures is not None and failures != settings.AXES_FAILURE_LIMIT:
        return
    audit.record("login.lockout", source_ip=ip_address, target=username or "", path=request.path, failures=failures)


class NoStoreMiddleware(MiddlewareMixin):
    """`Cache-Control: no-store` on every page and API answer (static files are
    served before this by WhiteNoise): what a signed-in person saw must not be
    kept by a browser or a proxy for the next person at the same machine."""

    def process_response(self, request, response):
        if "Cache-Control" not in response or "no-store" not in response["Cache-Control"]:
            response["Cache-Control"] = "no-store"
        return response


class SignedOutFragmentMiddleware(MiddlewareMixin):
    """A fragment asked for after the session ended (a page left open overnight) is
    answered by sending the whole page to sign in, and back to that page after:
    the browser would otherwise follow the redirect and put the sign-in form inside
    the fragment's box (the environment page's instances, the deliveries)."""

    def process_response(self, request, response):
        login = resolve_url(settings.LOGIN_URL)
        if not (request.headers.get("HX-Request") and response.status_code == 302
                and response.get("Location", "").startswith(login)):
            return response
        page = urlsplit(request.headers.get("HX-Current-URL", ""))
        # only the path and query of the page: never an address on another host
        back = (page.path or "/") + (f"?{page.query}" if page.query else "")
        return HttpResponseClientRedirect(f"{login}?{urlencode({'next': back})}")
