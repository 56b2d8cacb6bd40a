from django.urls import path

from .consumers import DashboardConsumer, ReleaseConsumer

websocket_urlpatterns = [
    path("ws/releases/<int:release_id>/", ReleaseConsumer.as_asgi()),
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
]
