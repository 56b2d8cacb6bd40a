from django.contrib import admin
from rest_framework.authtoken.admin import TokenAdmin as DRFTokenAdmin
from rest_framework.authtoken.models import TokenProxy

from . import audit, services, tokens
from .models import AuditEvent, Environment, Recipe, Release, Step


class AuditedAdmin(admin.ModelAdmin):
    """Changes made in the admin are audit events like any other."""

    def save_model(self, request, obj, form, change):
        before = services.configuration_values(type(obj).objects.get(pk=obj.pk)) if change else {}
        super().save_model(request, obj, form, change)
        services.configuration_audit(obj, created=not change, before=before, actor=request.user,
                                     source_ip=request.META.get("REMOTE_ADDR"))

    def delete_model(self, request, obj):
        audit.record(f"{obj._meta.model_name}.delete", actor=request.user, source_ip=request.META.get("REMOTE_ADDR"), target=str(obj))
        super().delete_model(request, obj)


@admin.register(Recipe)
class RecipeAdmin(AuditedAdmin):
    list_display = ("name", "updated_at")


@admin.register(Environment)
class EnvironmentAdmin(AuditedAdmin):
    list_display = ("name", "region", "load_balancer_name", "desired_count", "last_baked_ami")


class StepInline(admin.TabularInline):
    model = Step
    fields = ("position", "key", "kind", "status", "attempts", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    # read-only: releases change through the services, never by editing rows
    list_display = ("id", "environment", "revision", "strategy", "status", "requested_by", "created_at")
    list_filter = ("status", "environment")
    readonly_fields = [f.name for f in Release._meta.fields]
    inlines = [StepInline]

    def has_add_permission(self, request):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("at", "actor_name", "action", "target", "environment", "release")
    list_filter = ("action",)
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # append-only: the database refuses it too (PostgreSQL), and the chain shows it

# DRF's own admin lists every key in full; ours shows a prefix, creates none
# (a person makes their own on the profile page, where it is shown once), and
# audits a revoke made here.
admin.site.unregister(TokenProxy)
# A token's str() is its key, and the admin puts str(obj) in page titles, the
# delete confirmation and its own LogEntry rows. TokenProxy exists only for
# the admin, so naming it by prefix here changes nothing else.
TokenProxy.__str__ = lambda token: f"{tokens.token_prefix(token.key)} ({token.user})"


@admin.register(TokenProxy)
class TokenAdmin(DRFTokenAdmin):
    list_display = ("prefix", "user", "created")
    fields = ("prefix", "user", "created")
    readonly_fields = fields

    @admin.display(description="Token")
    def prefix(self, obj):
        return tokens.token_prefix(obj.key)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def delete_model(self, request, obj):
        tokens.token_revoke(user=obj.user, actor=request.user, source_ip=request.META.get("REMOTE_ADDR"))
