from django.contrib import admin
from django.urls import include, path

from releases import views as release_views

from . import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("accounts/profile/", release_views.profile, name="profile"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("releases.urls")),
]

# JSON under /api/, pages elsewhere (deployer/handlers.py)
handler400 = "deployer.handlers.bad_request"
handler403 = "deployer.handlers.permission_denied"
handler404 = "deployer.handlers.page_not_found"
handler500 = "deployer.handlers.server_error"
