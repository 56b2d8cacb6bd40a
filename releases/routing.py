from django.urls import path

from .consumers import ReleaseConsumer

websocket_urlpatterns = [
    path("ws/releases/<int:release_id>/", ReleaseConsumer.as_asgi()),
]
