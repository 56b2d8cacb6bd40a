"""The pages: dashboard, environments, the release wizard, the release page, audit.

Every action is a POST through the same services the API uses; a service's
refusal (a late or double click, say) comes back as a message, never as a
second transition.
"""

from __future__ import annotations

import math
import time
from functools import wraps
from itertools import islice

from asgiref.sync import sync_to_async

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.db import OperationalError
from django.http import Http404, HttpResponse, HttpResponseForbidden, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from deployer.errors import AdapterError

from . import params, permissions, plan, selectors, services, tokens
from .forms import (AuditFilterForm, ChannelForm, DecisionForm, EnvironmentChoiceForm, EnvironmentForm, ImportLookupForm,
                    OptionsForm, PasswordConfirmForm, RecipeForm, RevisionForm)
from .models import Environment, NotificationChannel, Recipe, RecipeChange, Release

WIZARD = "release_wizard"
WIZARD_STEPS = ("environment", "revision", "options", "review")


def needs(check, what: str, *, refused=None):
    """`refused(request, **kwargs)`: records a refused POST in the audit (gate decisions, release actions, recipes)."""
    def decorator(view):
        @login_required
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not check(request.user):
                if refused is not None and request.method == "POST":
                    refused(request, **kwargs)
                return HttpResponseForbidden(render(request, "403.html", {"needed": what}).content)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


viewer = needs(permissions.can_view, "the viewer, deployer, approver or maintainer role")
deployer = needs(permissions.can_deploy, "the deployer role")
maintainer = needs(permissions.can_maintain, "the maintainer role")
configurer = needs(permissions.can_configure, "the deployer or maintainer role")


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR")


def _gate_refused(request, release_id: int, key: str, decision: str = "") -> None:
    attempted = decision if decision in ("approve", "reject", "assign", "unassign") else "decide"
    services.refused_without_role(release_id=release_id, key=key, attempted=attempted, actor=request.user,
                                  source_ip=client_ip(request), message="deciding a gate needs the approver role")


def _action_refused(request, release_id: int, action: str) -> None:
    if action in ACTIONS:
        services.refused_without_role(release_id=release_id, attempted=action, actor=request.user, source_ip=client_ip(request),
                                      message=f"{ACTION_VERBS[action]} needs the deployer role")


def _recipe_refused(request, name: str | None = None, **_) -> None:
    services.refusal_record(action="recipe.refused", actor=request.user, source_ip=client_ip(request), target=name or "",
                            reason="role", message="changing recipes needs the maintainer role: a recipe's commands run on the workers")


# -- dashboard ------------------------------------------------------------------------


@viewer
def dashboard(request):
    active = selectors.active_releases()
    template = "releases/_dashboard.html" if request.htmx else "releases/dashboard.html"  # htmx polls the body
    return render(request, template, {
        "waiting": selectors.waiting_on(request.user),
        "active": [(r, selectors.current_step(r)) for r in active],
        "recent": selectors.recent_releases(limit=20),
        "environments": selectors.environment_rows(),
        "can_deploy": permissions.can_deploy(request.user),
    })


# -- environments ---------------------------------------------------------------------


@viewer
def environment_list(request):
    environments = Environment.objects.select_related("recipe").order_by("name")
    return render(request, "releases/environments.html", {"environments": environments, "can_maintain": permissions.can_maintain(request.user)})


@viewer
def environment_detail(request, name: str):
    # AWS is asked after the page, by its two fragments (environment_aws): the page answers at once
    environment = get_object_or_404(Environment.objects.select_related("recipe"), name=name)
    return render(request, "releases/environment.html", {
        "environment": environment, "access": selectors.environment_access(environment),
        "cleanup": selectors.cleanup_schedule(environment),
        "can_deploy": permissions.can_deploy(request.user), "can_configure": permissions.can_configure(request.user),
        **_notifications_context(request, environment),
        "may_release": permissions.may_deploy_in(request.user, environment),
    })


AWS_PARTS = {"instances": "releases/_instances.html", "images": "releases/_images.html"}


@viewer
def environment_aws(request, name: str, part: str):
    """What AWS says of an environment, for its page to load after it has answered: its instances
    (state, load balancer health, revision, launching release), or its images and what the next
    clean-up does with them; AWS's error in their place when it does not answer."""
    if part not in AWS_PARTS:
        raise Http404("instances or images")
    environment = get_object_or_404(Environment, name=name)
    context = {"environment": environment}
    if part == "instances":
        try:
            context.update(instances=selectors.environment_instances(environment), aws_error="")
        except AdapterError as exc:
            context.update(instances=[], aws_error=str(exc))
    else:
        context["cleanup"] = selectors.cleanup_images(environment)
    return render(request, AWS_PARTS[part], context)


@deployer
@require_POST
def environment_preflight(request, name: str):
    """The Check button: a worker runs the preflight; the page shows its answer."""
    environment = get_object_or_404(Environment.objects.select_related("recipe"), name=name)
    try:
        checks = services.environment_preflight(environment=environment, actor=request.user, source_ip=client_ip(request))
    except services.NotAllowed as exc:  # not in the environment's deploy groups
        return HttpResponseForbidden(render(request, "403.html", {"needed": str(exc)}).content)
    return render(request, "releases/environment.html", {
        "environment": environment, "checks": checks, "cleanup": selectors.cleanup_schedule(environment),
        "failed": services.preflight_failed(checks), "access": selectors.environment_access(environment),
        "can_deploy": True, "can_configure": permissions.can_configure(request.user),
        **_notifications_context(request, environment),
        "may_release": permissions.may_deploy_in(request.user, environment),
    })


@deployer
def environment_ssh_config(request, name: str):
    """The environment's ssh config and known_hosts, zipped: for deployers (it maps the fleet, names no key)."""
    environment = get_object_or_404(Environment, name=name)
    try:
        data = services.environment_ssh_config_export(environment=environment, actor=request.user, source_ip=client_ip(request))
    except AdapterError as exc:
        messages.warning(request, f"Could not list the instances: {exc}")
        return redirect("environment", name=name)
    except services.NotAllowed as exc:  # not in the environment's deploy groups
        return HttpResponseForbidden(render(request, "403.html", {"needed": str(exc)}).content)
    response = HttpResponse(data, content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="greenlight-{environment.name}-ssh.zip"'
    return response


# -- notification channels ---------------------------------------------------------------


DELIVERIES_POLL = (2, 60)  # seconds: the soonest and the latest the page asks again while a delivery is on its way


def _deliveries_context(environment: Environment) -> dict:
    deliveries = selectors.deliveries(environment=environment, limit=20)
    unfinished = [d for d in deliveries if d.status in d.UNFINISHED]
    # while one is still on its way (a test just queued, a retry), the page asks again for the rows: in 2 s,
    # or, when every one waits for a retry later, when the soonest is due (at most a minute)
    now, soonest, latest = timezone.now(), *DELIVERIES_POLL
    due = [(d.next_attempt_at - now).total_seconds() for d in unfinished
           if d.status == d.Status.PENDING and d.next_attempt_at is not None]
    waiting = len(due) == len(unfinished) and due
    poll = math.ceil(min(max(min(due), soonest), latest)) if waiting else soonest
    return {"environment": environment, "deliveries": deliveries, "deliveries_unfinished": bool(unfinished),
            "deliveries_poll": poll}


def _notifications_context(request, environment: Environment) -> dict:
    user = request.user
    return {
        "channels": list(environment.channels.all()),
        **_deliveries_context(environment),
        "can_maintain": permissions.can_maintain(user),
        "can_test_channels": permissions.can_maintain(user) or permissions.may_deploy_in(user, environment),
    }


@maintainer
def channel_edit(request, name: str, channel_id: int | None = None):
    """Add or change a channel; its URL and secret are write-only (ChannelForm)."""
    environment = get_object_or_404(Environment, name=name)
    channel = get_object_or_404(NotificationChannel, pk=channel_id, environment=environment) if channel_id else None
    form = ChannelForm(request.POST or None, instance=channel, environment=environment)
    if request.method == "POST" and form.is_valid():
        try:
            saved = services.channel_save(form=form, actor=request.user, source_ip=client_ip(request))
        except services.ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Saved the channel {saved.name}.")
            return redirect("environment", name=environment.name)
    title = f"{environment.name}: edit the channel {channel.name}" if channel else f"{environment.name}: add a notification channel"
    return render(request, "releases/form.html", {"form": form, "title": title})


@maintainer
@require_POST
def channel_delete(request, name: str, channel_id: int):
    channel = get_object_or_404(NotificationChannel.objects.select_related("environment"), pk=channel_id, environment__name=name)
    services.channel_delete(channel=channel, actor=request.user, source_ip=client_ip(request))
    messages.success(request, f"Deleted the channel {channel.name}; its deliveries stay listed.")
    return redirect("environment", name=name)


@configurer
@require_POST
def channel_test(request, name: str, channel_id: int):
    """Send test: a worker sends it, as it sends every notification. The answer
    comes at once; the page's deliveries then follow the test's row until it is
    sent or failed (environment_deliveries), so no request waits on a receiver."""
    channel = get_object_or_404(NotificationChannel.objects.select_related("environment"), pk=channel_id, environment__name=name)
    try:
        services.channel_test(channel=channel, actor=request.user, source_ip=client_ip(request))
    except services.ServiceError as exc:
        return HttpResponseForbidden(render(request, "403.html", {"needed": str(exc)}).content) \
            if isinstance(exc, services.NotAllowed) else HttpResponse(str(exc), status=exc.status)
    messages.success(request, f"Test queued for {channel.name}: its delivery below says when a worker has sent it.")
    return redirect("environment", name=name)


@viewer
def environment_deliveries(request, name: str):
    """The environment page's recent deliveries, for the page to poll while one is on its way."""
    environment = get_object_or_404(Environment, name=name)
    return render(request, "releases/_environment_deliveries.html", _deliveries_context(environment))


def _edit(request, model, form_class, name: str | None, title: str, done, extra: dict | None = None, **form_options):
    """Add or edit an environment or a recipe through its form; a service's
    refusal is shown as the form's error."""
    instance = get_object_or_404(model, name=name) if name else None
    form = form_class(request.POST or None, instance=instance, **form_options)
    if request.method == "POST" and form.is_valid():
        try:
            saved = services.configuration_save(form=form, actor=request.user, source_ip=client_ip(request))
        except services.ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            if isinstance(saved, RecipeChange):
                messages.success(request, f"Proposed a change to {saved.recipe.name}: it takes effect when another maintainer approves it.")
                return redirect("recipe_edit", name=saved.recipe.name)
            messages.success(request, f"Saved {saved.name}.")
            return done(saved)
    return render(request, "releases/form.html", {"form": form, "title": f"Edit {name}" if name else title, **(extra or {})})


@maintainer
def environment_new(request):
    return _environment_form(request, None)


@configurer
def environment_edit(request, name: str):
    return _environment_form(request, name)


def _environment_form(request, name: str | None):
    locked = not permissions.can_maintain(request.user)
    return _edit(request, Environment, EnvironmentForm, name, "Add environment", lambda saved: redirect("environment", name=saved.name),
                 extra={"locked_note": locked}, user=request.user)


@needs(permissions.can_maintain, "the maintainer role", refused=_recipe_refused)
def recipe_edit(request, name: str | None = None):
    changes = []
    if name:
        changes = list(RecipeChange.objects.filter(recipe__name=name, status=RecipeChange.Status.PENDING).select_related("proposed_by"))
        for change in changes:
            change.diff = services.configuration_diff({"definition": change.recipe.definition}, {"definition": change.definition})
            change.may_approve = change.proposed_by_id != request.user.pk
    return _edit(request, Recipe, RecipeForm, name, "Add recipe", lambda saved: redirect("environments"),
                 extra={"changes": changes})


@needs(permissions.can_maintain, "the maintainer role", refused=_recipe_refused)
@require_POST
def recipe_change_decide(request, name: str, change_id: int, decision: str):
    change = get_object_or_404(RecipeChange.objects.select_related("recipe", "proposed_by"), pk=change_id, recipe__name=name)
    decide = {"approve": services.recipe_change_approve, "reject": services.recipe_change_reject}.get(decision)
    if decide is None:
        raise Http404("approve or reject")
    try:
        decide(change=change, actor=request.user, source_ip=client_ip(request))
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{'Applied' if decision == 'approve' else 'Rejected'} the change to {name}.")
    return redirect("recipe_edit", name=name)


@maintainer
def environment_import(request):
    """Pick a region and a classic load balancer or a target group, see its
    instances and tags, then save it as an environment with what AWS already
    knows filled in."""
    lookup = ImportLookupForm(request.GET or None)
    context = {"lookup": lookup}
    if request.GET and lookup.is_valid():
        data = lookup.cleaned_data
        where = lookup.where()
        try:
            if data["target_group_arn"]:
                found = selectors.describe_target_group(**where, target_group_arn=data["target_group_arn"])
            else:
                found = selectors.describe_load_balancer(**where, load_balancer_name=data["load_balancer_name"])
        except AdapterError as exc:
            lookup.add_error(None, str(exc))
        else:
            first = found["instances"][0] if found["instances"] else {}
            initial = {
                **where,
                "load_balancer_name": data["load_balancer_name"],
                "target_group_arn": data["target_group_arn"],
                "name": data["load_balancer_name"] or found.get("load_balancer_name") or found["name"],
                "public_url": f"http://{found['dns_name']}/" if found["dns_name"] else "",
                "app_port": found["instance_port"] or 80,
                "health_path": found["health_path"] or "/health",
                "subnet_id": first.get("subnet_id") or (found["subnets"][0] if found["subnets"] else ""),
                "security_group_ids": list(first.get("security_groups") or found["security_groups"]),
                "key_name": first.get("key_name", ""),
                "base_ami": first.get("image_id", ""),
                "instance_type": first.get("instance_type", "t3.micro"),
                "desired_count": len(found["instances"]) or 2,
            }
            context.update(found=found, form=EnvironmentForm(initial=initial, user=request.user))
    return render(request, "releases/environment_import.html", context)


# -- the release wizard ------------------------------------------------------------------


@deployer
def release_new(request):
    data = request.session.get(WIZARD, {})
    step = request.GET.get("step") or request.POST.get("step") or "environment"
    if step not in WIZARD_STEPS:
        step = "environment"
    if request.method == "GET" and "environment" in request.GET:  # "release this" from an environment page
        data = {"environment": request.GET["environment"]}
        request.session[WIZARD] = data
    forms = {
        "environment": lambda post: EnvironmentChoiceForm(post, initial=data, user=request.user),
        "revision": lambda post: RevisionForm(post, initial=data),
        "options": lambda post: OptionsForm(post, initial=data or None),
    }
    environment = Environment.objects.filter(name=data.get("environment")).select_related("recipe").first()
    if step != "environment" and environment is None:
        return redirect(reverse("release_new"))
    if environment is not None and (refused := permissions.deploy_refusal(request.user, environment, "Releasing")):
        # a link (?environment=X) or an old session must not show a revision step (its branches and
        # tags, its commits) where this person may not start a release: step 1 lists where they may
        request.session[WIZARD] = {}
        messages.error(request, refused[1] + ".")
        return redirect(reverse("release_new"))
    if step == "options" and "strategy" not in data:
        # the environment's own default, never another one chosen silently (the form says when it cannot run)
        data.setdefault("strategy", environment.default_strategy)
        data.setdefault("clone_count", environment.desired_count)
    forms["options"] = lambda post: OptionsForm(post, initial=data or None, environment=environment)
    form = forms[step](None) if step in forms else None
    if request.method == "POST":
        going_back = "back" in request.POST
        if step == "review" and "recheck" in request.POST:
            data.pop("preflight", None)
            request.session[WIZARD] = data
            return redirect(f"{reverse('release_new')}?step=review")
        if step == "review" and not going_back:
            return _start(request, data, environment)
        post = request.POST
        if step == "revision" and post.get("pick"):  # a tag, branch or commit picked from the list
            post = post.copy()
            post["revision"] = post["pick"]
        form = forms[step](post) if step in forms else None
        if going_back:
            if form is not None and form.is_valid():  # keep what was typed on the way back
                data.update({k: v.name if isinstance(v, Environment) else v for k, v in form.cleaned_data.items()})
                request.session[WIZARD] = data
            return redirect(f"{reverse('release_new')}?step={WIZARD_STEPS[WIZARD_STEPS.index(step) - 1]}")
        if form.is_valid():
            values = {k: v.name if isinstance(v, Environment) else v for k, v in form.cleaned_data.items()}
            if step == "revision" and not _revision_exists(form, environment, values["revision"]):
                return render(request, "releases/wizard.html", _wizard_context(step, form, data, environment))
            values.update({k: v for k, v in form.cleaned_data.items() if k == "revision_note"})
            if step == "environment" and (busy := _busy(request.user).get(values["environment"])):
                form.add_error("environment", f"{values['environment']} is busy: release #{busy.pk} ({busy.status}) "
                                              "holds it until it ends, is rolled back or cancelled")
                return render(request, "releases/wizard.html", _wizard_context(step, form, data, environment,
                                                                                user=request.user))
            if step == "revision":
                data.pop("changes", None)
            data.update(values)
            request.session[WIZARD] = data
            return redirect(f"{reverse('release_new')}?step={WIZARD_STEPS[WIZARD_STEPS.index(step) + 1]}")
    context = _wizard_context(step, form, data, environment, user=request.user)
    if step == "review" and environment is not None:
        context["changes"] = _changes(request, data, environment)
    if step == "review" and settings.PREFLIGHT_BEFORE_RELEASE:
        checks = _preflight(request, data, environment)
        context.update(checks=checks, preflight_failed=services.preflight_failed(checks))
    return render(request, "releases/wizard.html", context)


COMMITS_POLL = 2  # seconds between the picker's looks for the recent commits a worker reads
COMMITS_POLLS = 60  # looks before it stops and says no worker has read them


@deployer
def release_new_commits(request):
    """The revision picker's recent commits, for the picker to load while a worker
    reads them (services.recent_commits): listed, still "Fetching…" (this
    fragment asks again), or why not. Where this person may start a release."""
    environment = permissions.deployable(request.user, Environment.objects.all()).filter(
        name=request.GET.get("environment", "")).first()
    if environment is None:
        raise Http404("no environment where you may start a release has that name")
    try:  # how many times the page has asked: a bad count (a hand-edited URL) starts again
        tries = min(params.whole_number(request.GET.get("tries"), "tries", default=0), COMMITS_POLLS)
    except params.BadInput:
        tries = 0
    picked = services.recent_commits(environment=environment, asked=request.GET.get("asked", "")[:32])
    if picked["pending"] and tries >= COMMITS_POLLS:
        picked = {"commits": [], "pending": False, "asked": "",
                  "error": f"no worker has read them in {COMMITS_POLL * COMMITS_POLLS} s: are the workers running?"}
    return render(request, "releases/_commits.html", {"picker": picked, "environment": environment, "tries": tries + 1,
                                                     "poll": COMMITS_POLL})


PREFLIGHT_FRESH = 600  # seconds a review's preflight stands for its start


def _preflight(request, data: dict, environment: Environment, *, fresh_only: bool = False) -> list[dict] | None:
    """The review's preflight for what the wizard holds: run by a worker once,
    kept in the session (server-side) for the start, for PREFLIGHT_FRESH seconds."""
    key = [environment.name, data.get("revision", ""), data.get("strategy", "bake")]
    kept = data.get("preflight") or {}
    if kept.get("key") == key and time.time() - kept.get("at", 0) < PREFLIGHT_FRESH:
        return kept["checks"]
    if fresh_only:
        return None
    try:
        checks = services.environment_preflight(environment=environment, actor=request.user, revision=key[1],
                                                strategy=key[2], source_ip=client_ip(request))
    except services.ServiceError as exc:
        return [{"name": "preflight", "status": "failed", "message": str(exc), "fix": ""}]
    data["preflight"] = {"key": key, "at": time.time(), "checks": checks}
    request.session[WIZARD] = data
    return checks


def _changes(request, data: dict, environment: Environment) -> dict:
    """The commits the review shows, read once per revision and kept in the session."""
    key = [environment.name, data.get("revision", "")]
    kept = data.get("changes") or {}
    if kept.get("key") != key:
        kept = {"key": key, "changes": services.revision_changes(environment=environment, revision=key[1])}
        data["changes"] = kept
        request.session[WIZARD] = data
    return kept["changes"]


def _busy(user) -> dict[str, Release]:
    """The environments this person may release to that an active release holds, by name."""
    held = Release.objects.filter(status__in=Release.ACTIVE,
                                  environment__in=permissions.deployable(user, Environment.objects.all()))
    return {r.environment.name: r for r in held.select_related("environment")}


def _revision_exists(form, environment: Environment, revision: str) -> bool:
    try:
        looked_up = services.revision_lookup(environment=environment, revision=revision)
    except services.ServiceError as exc:
        form.add_error("revision", str(exc))
        return False
    form.cleaned_data["revision_note"] = looked_up["note"]  # "revision not checked: ..." for the review
    return True


def _wizard_context(step: str, form, data: dict, environment: Environment | None, *, user=None) -> dict:
    context = {"step": step, "steps": WIZARD_STEPS, "form": form, "data": data, "environment": environment}
    if step == "environment" and user is not None:
        context["busy"] = sorted(_busy(user).values(), key=lambda r: r.environment.name)
    if step in ("revision", "review") and environment is not None:
        context["running"] = services.running_release(environment)
    if step == "revision" and environment is not None:
        context.update(picker=services.repository_picker(environment=environment), tries=1, poll=COMMITS_POLL)
    if step == "review" and environment is not None:
        strategy = data.get("strategy", "bake")
        context["plan"] = plan.STRATEGIES.get(strategy, ())
        try:
            context["retiring"] = selectors.environment_instances(environment, registered_only=True)
        except AdapterError as exc:
            context["retiring"], context["aws_error"] = [], str(exc)
        context["new_count"] = int(data.get("clone_count") or environment.desired_count)
    return context


def _start(request, data: dict, environment: Environment):
    checks = _preflight(request, data, environment, fresh_only=True) if settings.PREFLIGHT_BEFORE_RELEASE else None
    try:
        release = services.release_start(
            environment=environment, revision=data.get("revision", ""), strategy=data.get("strategy", "bake"),
            fleet_size=int(data.get("clone_count") or environment.desired_count), actor=request.user, source_ip=client_ip(request),
            checks=checks,
        )
    except services.ServiceError as exc:
        messages.error(request, str(exc))
        return redirect(f"{reverse('release_new')}?step=review")
    except OperationalError as exc:
        if not services.lost_race(exc):
            raise
        messages.error(request, services.LOST_RACE)
        return redirect(f"{reverse('release_new')}?step=review")
    request.session.pop(WIZARD, None)
    messages.success(request, f"Release #{release.pk} started.")
    return redirect("release", release_id=release.pk)


# -- the release page ---------------------------------------------------------------------


def _panel_context(request, release_id: int) -> dict:
    release = selectors.release_for_detail(release_id)
    user = request.user
    steps = list(release.steps.all())
    gates = selectors.gate_cards(release, steps, user)
    history = list(release.history.all())
    instances = list(release.instances.all())
    timeline = selectors.timeline(release, steps, history)
    explanation = next((row["explanation"] for row in timeline if row["explanation"]), None)
    return {
        "release": release,
        "steps": steps,
        "timeline": timeline,
        "explanation": explanation,
        "confirm": selectors.confirmations(release, steps, instances, explanation),
        "summary": selectors.end_summary(release, instances),
        "outcome": selectors.release_outcome(release, history),
        # what the live refresh compares to know the state moved on (and drop the flash messages)
        "state_key": ":".join([release.status, *(f"{s.pk}{s.status[0]}{s.attempts}" for s in steps)]),
        "gates": gates,
        "decided_gates": [s for s in steps if s.kind == "gate" and s.status != "awaiting_approval" and s.approvals.all()],
        "instances": instances,
        "may_deploy": permissions.may_deploy_in(user, release.environment),
        "decision_form": DecisionForm(),
        "failed_step": next((s for s in steps if s.status == "failed"), None),
        "actions": selectors.person_actions(release, steps),
        "history": history,
        "deliveries": selectors.deliveries(release=release),
    }


@viewer
def release_page(request, release_id: int):
    get_object_or_404(Release, pk=release_id)
    context = _panel_context(request, release_id)
    context["step_keys"] = [s.key for s in context["steps"]]
    return render(request, "releases/release.html", context)


@viewer
def release_panel(request, release_id: int):
    get_object_or_404(Release, pk=release_id)
    return render(request, "releases/_panel.html", _panel_context(request, release_id))


@viewer
def release_log_download(request, release_id: int):
    release = get_object_or_404(Release, pk=release_id)
    response = StreamingHttpResponse(selectors.log_text(release.pk), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="release-{release.pk}.log"'
    return response


def _act(request, release_id: int, service, done, **kwargs):
    """`done`: the message, or a function of what the service returned that says it."""
    release = get_object_or_404(Release.objects.select_related("environment"), pk=release_id)
    try:
        result = service(release=release, actor=request.user, source_ip=client_ip(request), **kwargs)
        messages.success(request, done(result) if callable(done) else done)
    except services.ServiceError as exc:
        messages.warning(request, str(exc))
    except OperationalError as exc:
        if not services.lost_race(exc):
            raise
        messages.warning(request, services.LOST_RACE)
    return redirect("release", release_id=release_id)


# The role is checked before the release is looked up (by `needs`), so a
# person without it gets the same 403 whether or not the release exists.
@require_POST
@needs(permissions.can_approve, "the approver role", refused=_gate_refused)
def release_decide(request, release_id: int, key: str, decision: str):
    if decision not in ("approve", "reject"):
        raise Http404("approve or reject")
    form = DecisionForm(request.POST)
    if not form.is_valid():
        # nothing is decided on a comment that does not fit: the page says why and keeps what was typed
        get_object_or_404(Release, pk=release_id)
        context = _panel_context(request, release_id)
        context.update(step_keys=[s.key for s in context["steps"]], decision_key=key,
                       decision_comment=request.POST.get("comment", ""), decision_error=" ".join(form.errors["comment"]))
        return render(request, "releases/release.html", context, status=400)
    comment = form.cleaned_data["comment"]
    if decision == "approve":
        def approved(step):
            if step.status != "awaiting_approval":
                return f"Approved {key}."
            given, needed = step.approvals.filter(decision="approve").count(), permissions.approvals_required(step.release)
            return f"Approved {key}: {given} of {needed} approvals; someone else gives the next one."
        return _act(request, release_id, services.gate_approve, approved, key=key, comment=comment)
    return _act(request, release_id, services.gate_reject, f"Rejected {key}.", key=key, comment=comment)


@require_POST
@needs(permissions.can_approve, "the approver role", refused=_gate_refused)
def release_assign(request, release_id: int, key: str, decision: str):
    """Assign to me, or Unassign: not a lock, only who has taken the gate."""
    if decision == "assign":
        return _act(request, release_id, services.gate_assign, f"You have taken {key}.", key=key)
    if decision == "unassign":
        return _act(request, release_id, services.gate_unassign, f"Nobody has taken {key} now.", key=key)
    raise Http404("assign or unassign")


ACTIONS = {
    "cancel": (services.release_cancel, "Cancelling: cleaning up."),
    "retry": (services.release_retry, "Retrying the failed step."),
    "rollback": (services.release_rollback, "Rolling back."),
}
ACTION_VERBS = {"cancel": "cancelling a release", "retry": "retrying a release", "rollback": "rolling back"}


@require_POST
@needs(permissions.can_deploy, "the deployer role", refused=_action_refused)
def release_action(request, release_id: int, action: str):
    if action not in ACTIONS:
        raise Http404("cancel, retry or rollback")
    return _act(request, release_id, *ACTIONS[action])


# -- audit ----------------------------------------------------------------------------------


AUDIT_PAGE = 50


@viewer
def audit_page(request):
    form = AuditFilterForm(request.GET or None, choices=selectors.audit_choices())
    filters = form.filters() if form.is_bound else {}
    events = selectors.audit_events(**filters)
    export = request.GET.get("format")
    if export == "csv":
        response = StreamingHttpResponse(_streamed(request, selectors.audit_csv_rows(events)), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="greenlight-audit.csv"'
        return response
    if export == "json":
        response = JsonResponse({"events": [selectors.audit_dict(e) for e in events.iterator(chunk_size=1000)]})
        response["Content-Disposition"] = 'attachment; filename="greenlight-audit.json"'
        return response
    people = request.GET.get("view") != "everything"
    page, shown = selectors.audit_page(selectors.audit_people(events) if people else events, request.GET.get("page"),
                                       per_page=AUDIT_PAGE)
    calls = selectors.audit_calls_of(shown) if people else {}
    rows = [(event, calls.get(event.pk, [])) for event in shown]
    query = request.GET.copy()
    for name in ("page", "format"):
        query.pop(name, None)
    views = {}
    for key, label in AuditFilterForm.VIEWS:
        other = query.copy()
        other["view"] = key
        views[key] = (label, other.urlencode())
    return render(request, "releases/audit.html", {
        "form": form, "page": page, "rows": rows, "people": people, "query": query.urlencode(), "views": views,
        "page_range": page.paginator.get_elided_page_range(page.number, on_each_side=2, on_ends=1),
        "chain": selectors.audit_chain(),
    })


def _streamed(request, lines, batch: int = 500):
    """`lines` for a StreamingHttpResponse. Under ASGI an async iterator, each
    batch read in the request's thread, since Django would read a plain iterator
    to its end before sending a byte."""
    if not isinstance(request, ASGIRequest):
        return lines

    async def streamed():
        take = sync_to_async(lambda: "".join(islice(lines, batch)))
        while chunk := await take():
            yield chunk

    return streamed()


# -- profile --------------------------------------------------------------------------


@login_required
def profile(request):
    """One's own API token: its prefix; create or rotate (password again), revoke."""
    form = PasswordConfirmForm(request=request)
    new_key = None
    if request.method == "POST":
        if request.POST.get("action") == "revoke":
            if tokens.token_revoke(user=request.user, actor=request.user, source_ip=client_ip(request)):
                messages.success(request, "Your token is revoked: scripts using it are refused from now on.")
            return redirect("profile")
        form = PasswordConfirmForm(request.POST, request=request)
        if form.is_valid():
            new_key = tokens.token_rotate(user=request.user, actor=request.user, source_ip=client_ip(request))
            form = PasswordConfirmForm(request=request)
        elif form.has_error("password", "wrong_password"):
            # django-axes has counted it as a failed sign-in; the audit keeps each
            # one up to the lockout (later tries while locked out are axes' to count)
            failures = getattr(request, "axes_failures_since_start", None)
            if failures is None or failures <= settings.AXES_FAILURE_LIMIT:
                tokens.token_password_refused(user=request.user, source_ip=client_ip(request), failures=failures)
    token = tokens.token_of(request.user)
    # the new key is in this answer only (no-store, never redirected to, never shown again)
    return render(request, "registration/profile.html", {
        "form": form, "new_key": new_key,
        "token": token, "token_prefix": tokens.token_prefix(token) if token else None,
    })
