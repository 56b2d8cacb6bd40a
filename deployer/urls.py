from django.contrib import admin
from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import SpectacularSwaggerSplitView

from releases import openapi
from releases import views as release_views

from . import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    # before the app's own /api/ paths; both need a signed-in person (settings.SPECTACULAR_SETTINGS)
    path("api/schema/", openapi.SchemaView.as_view(), name="api-schema"),
    # a page for people: a stranger is sent to sign in. Its script is a file of its
    # own (?script), so the Content-Security-Policy needs no inline script.
    path("api/docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="api-schema", template_name="api/docs.html")),
         name="api-docs"),
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
