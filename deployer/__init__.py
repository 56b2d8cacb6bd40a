"""The Django project and the adapters that touch the outside world."""

from .celery import app as celery_app

__all__ = ["celery_app"]
