"""The JSON API (stable: scripts and CI pipelines use it). See the README."""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from deployer import handlers

from . import openapi, params, permissions, selectors, services
from .models import Environment, Release

AUDIT_PAGE = 100


def exception_handler(exc, context):
    """Every error is {"error": "..."}: ours, DRF's and Django's alike."""
    if isinstance(exc, services.ServiceError):
        return Response({"error": str(exc), **exc.details}, status=exc.status)
    if services.lost_race(exc):
        return Response({"error": services.LOST_RACE}, status=409)
    if isinstance(exc, RequestDataTooBig):
        return Response({"error": handlers.too_big()}, status=413)
    if isinstance(exc, RecursionError):  # a body of "[[[[..." deeper than the JSON parser goes
        return Response({"error": "the body is nested too deeply to read"}, status=400)
    response = drf_exception_handler(exc, context)
    if response is not None:
        detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        response.data = {"error": str(detail)}
    return response


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR")


def _body(request) -> dict:
    if not isinstance(request.data, dict):
        raise services.BadInput("the body must be a JSON object")
    for name, value in request.data.items():
        if not params.storable(name):
            raise services.BadInput("a field name holds a NUL or lone surrogate character", field=params.printable_name(name))
        if isinstance(value, str):
            params.text(value, name)
    return request.data


def _viewer(request) -> None:
    if not permissions.can_view(request.user):
        raise exceptions.PermissionDenied("reading needs the viewer, deployer or approver role")


def _may(check, what: str, request, *, attempted: str = "", release_id: int | None = None, key: str = "") -> None:
    """The role first, then the release: a person without it learns nothing
    about which releases exist (the same 403 for every id). A refused change
    (`attempted`) is audited."""
    if not check(request.user):
        if attempted:
            raise services.refused_without_role(release_id=release_id, key=key, attempted=attempted, message=what,
                                                actor=request.user, source_ip=client_ip(request))
        raise services.NotAllowed(what)


def _release(release_id: int) -> Release:
    try:
        return Release.objects.select_related("environment").get(pk=release_id)
    except Release.DoesNotExist:
        raise services.NotFound(f"there is no release {release_id}") from None


@openapi.environment_list
@api_view(["GET"])
def environment_list(request):
    _viewer(request)
    return Response({"environments": selectors.environments()})


@openapi.release_create
@api_view(["POST"])
def release_create(request):
    _may(permissions.can_deploy, "starting a release needs the deployer role", request, attempted="start")
    body = _body(request)
    unknown = set(body) - {"environment", "revision", "strategy", "clone_count"}
    if unknown:
        raise services.BadInput(f"unknown fields: {', '.join(sorted(unknown))}")
    name = body.get("environment")
    if not isinstance(name, str) or not name:
        raise services.BadInput("environment is required: the name of an environment", field="environment")
    environment = Environment.objects.select_related("recipe").filter(name=name).first()
    if environment is None:
        raise services.BadInput(f"there is no environment {name!r}", field="environment")
    revision = body.get("revision")
    if not isinstance(revision, str):
        raise services.BadInput("revision is required: a branch, tag or commit", field="revision")
    strategy = body.get("strategy", environment.default_strategy)
    if not isinstance(strategy, str):
        raise services.BadInput("strategy is bake or deploy_from_image", field="strategy")
    release = services.release_start(
        environment=environment, revision=revision, strategy=strategy, fleet_size=body.get("clone_count"),
        actor=request.user, source_ip=client_ip(request),
    )
    return Response(selectors.release_dict(selectors.release_for_detail(release.pk)), status=201)


@openapi.environment_preflight
@api_view(["POST"])
def environment_preflight(request, name: str):
    _may(permissions.can_deploy, "running a preflight needs the deployer role", request)
    body = _body(request) if request.data else {}
    unknown = set(body) - {"revision", "strategy"}
    if unknown:
        raise services.BadInput(f"unknown fields: {', '.join(sorted(unknown))}")
    revision, strategy = body.get("revision", ""), body.get("strategy", "")
    if not isinstance(revision, str):
        raise services.BadInput("revision is a branch, tag or commit", field="revision")
    if not isinstance(strategy, str):
        raise services.BadInput("strategy is bake or deploy_from_image", field="strategy")
    environment = Environment.objects.select_related("recipe").filter(name=name).first()
    if environment is None:
        raise services.NotFound(f"there is no environment {name!r}")
    checks = services.environment_preflight(environment=environment, actor=request.user, revision=revision,
                                            strategy=strategy, source_ip=client_ip(request))
    return Response({"environment": environment.name, "ok": not services.preflight_failed(checks), "checks": checks})


@openapi.release_detail
@api_view(["GET"])
def release_detail(request, release_id: int):
    _viewer(request)
    try:
        release = selectors.release_for_detail(release_id)
    except Release.DoesNotExist:
        raise services.NotFound(f"there is no release {release_id}") from None
    return Response(selectors.release_dict(release))


def _comment(request) -> str:
    comment = _body(request).get("comment", "")
    if not isinstance(comment, str) or len(comment) > services.COMMENT_LIMIT:
        raise services.BadInput(f"comment is text of at most {services.COMMENT_LIMIT} characters", field="comment")
    return comment


def _approver(request, release_id: int, key: str, attempted: str) -> Release:
    _may(permissions.can_approve, "deciding a gate needs the approver role", request, attempted=attempted,
         release_id=release_id, key=key)
    return _release(release_id)


@openapi.gate_decision("approve")
@api_view(["POST"])
def gate_approve(request, release_id: int, key: str):
    release = _approver(request, release_id, key, "approve")
    services.gate_approve(release=release, key=key, actor=request.user, comment=_comment(request), source_ip=client_ip(request))
    return Response(selectors.release_dict(selectors.release_for_detail(release_id)))


@openapi.gate_decision("reject")
@api_view(["POST"])
def gate_reject(request, release_id: int, key: str):
    release = _approver(request, release_id, key, "reject")
    services.gate_reject(release=release, key=key, actor=request.user, comment=_comment(request), source_ip=client_ip(request))
    return Response(selectors.release_dict(selectors.release_for_detail(release_id)))


@openapi.gate_assign
@openapi.gate_unassign
@api_view(["POST", "DELETE"])
def gate_assignee(request, release_id: int, key: str):
    """POST: "Assign to me" (the signed-in person takes the open gate); DELETE: nobody has it."""
    taking = request.method == "POST"
    release = _approver(request, release_id, key, "assign" if taking else "unassign")
    service = services.gate_assign if taking else services.gate_unassign
    service(release=release, key=key, actor=request.user, source_ip=client_ip(request))
    return Response(selectors.release_dict(selectors.release_for_detail(release_id)))


def _action(service):
    @api_view(["POST"])
    def view(request, release_id: int):
        _may(permissions.can_deploy, f"{ACTION_VERBS[service]} needs the deployer role", request,
             attempted=ACTION_NAMES[service], release_id=release_id)
        service(release=_release(release_id), actor=request.user, source_ip=client_ip(request))
        return Response(selectors.release_dict(selectors.release_for_detail(release_id)))

    return view


ACTION_VERBS = {services.release_cancel: "cancelling a release", services.release_retry: "retrying a release",
                services.release_rollback: "rolling back"}
ACTION_NAMES = {services.release_cancel: "cancel", services.release_retry: "retry", services.release_rollback: "rollback"}
release_cancel = openapi.release_action("cancel", "Cancel a release")(_action(services.release_cancel))
release_retry = openapi.release_action("retry", "Retry a release's failed step")(_action(services.release_retry))
release_rollback = openapi.release_action("rollback", "Roll a release back")(_action(services.release_rollback))


@openapi.release_logs
@api_view(["GET"])
def release_logs(request, release_id: int):
    _viewer(request)
    _release(release_id)
    after = params.whole_number(request.query_params.get("after"), "after", default=0)
    # more than a page is asked for in pages: `next` says where the next one starts
    limit = params.whole_number(request.query_params.get("limit"), "limit", default=selectors.LOG_PAGE, minimum=1)
    return Response(selectors.log_lines(release_id, after=after, limit=limit))


@openapi.audit_list
@api_view(["GET"])
def audit_list(request):
    _viewer(request)
    query = request.query_params
    dates = {name: params.moment(query.get(name), name) for name in ("since", "until")}
    release = params.whole_number(query.get("release"), "release", minimum=1)
    offset = params.whole_number(query.get("offset"), "offset", default=0)
    words = {name: params.text(query.get(name), name) for name in ("environment", "actor", "action")}
    events = selectors.audit_events(**words, release=release, **dates)
    page = list(events[offset: offset + AUDIT_PAGE + 1])
    return Response({
        "events": [selectors.audit_dict(e) for e in page[:AUDIT_PAGE]],
        "next_offset": offset + AUDIT_PAGE if len(page) > AUDIT_PAGE else None,
        "chain": selectors.audit_chain_dict(),
    })


