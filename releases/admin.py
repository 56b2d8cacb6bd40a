import json

from django import forms
from django.contrib import admin

from deployer import git

from . import audit, permissions, services, tokens
from .forms import EnvironmentForm
from .models import ApiToken, AuditEvent, Environment, Recipe, Release, Step


class AuditedAdmin(admin.ModelAdmin):
    """Changes made in the admin are audit events like any other."""

    def save_model(self, request, obj, form, change):
        form.audit_before = services.configuration_values(type(obj).objects.get(pk=obj.pk)) if change else {}
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        # recorded once the many-to-many fields (an environment's groups) are saved too
        super().save_related(request, form, formsets, change)
        services.configuration_audit(form.instance, created=not change, before=form.audit_before, actor=request.user,
                                     source_ip=request.META.get("REMOTE_ADDR"))

    # Django's model permissions and our roles, both: adding and deleting need the maintainer
    # role, changing what `change_role` says (a subclass's choice)
    change_role = staticmethod(permissions.can_maintain)

    def has_add_permission(self, request):
        return super().has_add_permission(request) and permissions.can_maintain(request.user)

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and self.change_role(request.user)

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and permissions.can_maintain(request.user)

    def delete_model(self, request, obj):
        audit.record(f"{obj._meta.model_name}.delete", actor=request.user, source_ip=request.META.get("REMOTE_ADDR"), target=str(obj))
        super().delete_model(request, obj)


@admin.register(Recipe)
class RecipeAdmin(AuditedAdmin):
    list_display = ("name", "updated_at")

    # Django's model permissions alone would let a staff member without the maintainer
    # role change what runs on the workers: the admin asks for the role too
    change_role = staticmethod(permissions.can_maintain)


class EnvironmentAdminForm(EnvironmentForm):
    """The dashboard's environment form (every rule, the access key never echoed,
    a non-maintainer's locked fields), with the fields only an administrator sets
    here: the last baked image and the cloud's time scale."""

    class Meta(EnvironmentForm.Meta):
        exclude = []  # the admin's own fields too

    def clean_last_baked_ami(self):
        return self._aws_id("last_baked_ami", "ami")

    def clean_time_scale(self):
        scale, check = self._checked("time_scale")
        if check and scale is not None and scale <= 0:
            raise forms.ValidationError("The time scale multiplies every wait on AWS: above 0 (1 on AWS).")
        return scale


@admin.register(Environment)
class EnvironmentAdmin(AuditedAdmin):
    list_display = ("name", "region", "load_balancer_name", "desired_count", "last_baked_ami")
    form = EnvironmentAdminForm

    def get_form(self, request, obj=None, change=False, **kwargs):
        # the form locks what the person's role may not change, as on the dashboard: it needs to know who
        form = super().get_form(request, obj, change=change, **kwargs)
        user = request.user

        class ForUser(form):
            def __init__(self, *args, **form_kwargs):
                super().__init__(*args, user=user, **form_kwargs)

        return ForUser

    # Adding and deleting an environment is a maintainer's; opening one to change it, a deployer's
    # or a maintainer's (the form then lets a deployer change only the fleet size and wait limits)
    change_role = staticmethod(permissions.can_configure)


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
    # the plan as plan_shown: its repository's password or token masked
    exclude = ["plan"]
    readonly_fields = [f.name for f in Release._meta.fields if f.name != "plan"] + ["plan_shown"]
    inlines = [StepInline]

    @admin.display(description="Plan")
    def plan_shown(self, obj):
        """The frozen plan; the deploy step reads the stored repository URL, a page shows it masked (git.shown)."""
        shown = dict(obj.plan or {})
        if isinstance(shown.get("environment"), dict):
            frozen = shown["environment"]
            shown["environment"] = {**frozen, "repository": git.shown(str(frozen.get("repository", "")))}
        return json.dumps(shown, indent=2, sort_keys=True)

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


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens by prefix, with when they were made and last used. An administrator
    revokes one here (audited like a revoke on the profile page) but never sees
    a key or its digest, and cannot make one: a person makes their own, where
    it is shown once."""

    list_display = ("prefix_shown", "user", "created", "last_used")
    fields = ("prefix_shown", "user", "created", "last_used")
    readonly_fields = fields
    search_fields = ("user__username",)  # never the prefix or digest: the admin is no oracle for a key
    ordering = ("user__username",)

    @admin.display(description="Token")
    def prefix_shown(self, obj):
        return tokens.token_prefix(obj)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def delete_model(self, request, obj):
        tokens.token_revoke(user=obj.user, actor=request.user, source_ip=request.META.get("REMOTE_ADDR"))

    def delete_queryset(self, request, queryset):
        # the list's "delete selected" action: each one a revoke, each one audited
        for token in queryset.select_related("user"):
            self.delete_model(request, token)
