from django.urls import path

from . import api, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("api/environments/", api.environment_list),
    path("api/releases/", api.release_create),
    path("api/releases/<int:release_id>/", api.release_detail),
    path("api/releases/<int:release_id>/gates/<str:key>/approve", api.gate_approve),
    path("api/releases/<int:release_id>/gates/<str:key>/reject", api.gate_reject),
    path("api/releases/<int:release_id>/cancel", api.release_cancel),
    path("api/releases/<int:release_id>/retry", api.release_retry),
    path("api/releases/<int:release_id>/rollback", api.release_rollback),
    path("api/releases/<int:release_id>/logs/", api.release_logs),
    path("api/audit/", api.audit_list),
]
