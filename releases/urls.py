from django.urls import path

from . import api, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("environments/", views.environment_list, name="environments"),
    path("environments/new/", views.environment_new, name="environment_new"),
    path("environments/import/", views.environment_import, name="environment_import"),
    path("environments/<slug:name>/", views.environment_detail, name="environment"),
    path("environments/<slug:name>/edit/", views.environment_edit, name="environment_edit"),
    path("environments/<slug:name>/ssh-config.zip", views.environment_ssh_config, name="environment_ssh_config"),
    path("recipes/new/", views.recipe_edit, name="recipe_new"),
    path("recipes/<slug:name>/edit/", views.recipe_edit, name="recipe_edit"),
    path("recipes/<slug:name>/changes/<int:change_id>/<str:decision>/", views.recipe_change_decide, name="recipe_change_decide"),
    path("releases/new/", views.release_new, name="release_new"),
    path("releases/<int:release_id>/", views.release_page, name="release"),
    path("releases/<int:release_id>/panel/", views.release_panel, name="release_panel"),
    path("releases/<int:release_id>/log.txt", views.release_log_download, name="release_log"),
    path("releases/<int:release_id>/gates/<str:key>/<str:decision>/", views.release_decide, name="release_decide"),
    path("releases/<int:release_id>/<str:action>/", views.release_action, name="release_action"),
    path("audit/", views.audit_page, name="audit"),
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
