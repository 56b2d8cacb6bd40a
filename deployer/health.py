"""`GET /healthz`: is this process able to do its job right now?

Load balancers and container orchestrators poll it, so it checks only what a
request needs (the database and Redis), answers fast, and never echoes a
connection string (it may hold a password).
"""

import redis
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

TIMEOUT_SECONDS = 2


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _redis() -> None:
    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=TIMEOUT_SECONDS,
        socket_timeout=TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()


CHECKS = {"database": _database, "redis": _redis}


@never_cache
@require_GET
def healthz(request):
    down = {}
    for name, check in CHECKS.items():
        try:
            check()
        except Exception as exc:
            down[name] = type(exc).__name__
    if down:
        return JsonResponse({"status": "unavailable", "down": down}, status=503)
    return JsonResponse({"status": "ok"})
