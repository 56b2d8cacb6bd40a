"""The API's OpenAPI description: the shapes releases/api.py reads and answers.

These serializers only describe (drf-spectacular reads them to write the
schema at /api/schema/); the views build their answers from the selectors'
plain dicts. A change of an answer's shape changes this file too: the
Schemathesis test (tests/test_api_schema.py) checks every answer against it.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from . import failures, params, selectors, services, transitions
from .models import Approval, Instance, Release, Step


class TokenScheme(OpenApiAuthenticationExtension):
    """DRF's token auth, by the header's own spelling: `Authorization: Token <key>`."""

    target_class = "releases.authentication.TokenAuthentication"
    name = "token"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey", "in": "header", "name": "Authorization",
            "description": "`Token <key>`: each person makes their own on their profile page, /accounts/profile/",
        }


# -- errors ------------------------------------------------------------------


class Error(serializers.Serializer):
    """Every error: what is wrong, and for bad input which field. Some add
    details: a conflict names the active `release` or the current `status`."""

    error = serializers.CharField(help_text="what is wrong, for people")
    field = serializers.CharField(required=False, help_text="the input at fault, where there is one")


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(Error, description=description)


UNAUTHENTICATED = {401: _error("not signed in: no token or session, or an unknown token")}
NO_ROLE = {403: _error("signed in, but without a role that may do this")}
BAD_INPUT = {400: _error("bad input; `field` names it where it is one field")}
UNKNOWN_RELEASE = {404: _error("there is no such release (or gate)")}
CONFLICT = {409: _error("the release is not in a state that allows this (a gate not open, an active release already)")}


# -- answers -----------------------------------------------------------------


class EnvironmentOut(serializers.Serializer):
    name = serializers.CharField()
    region = serializers.CharField()
    load_balancer = serializers.CharField(help_text="the classic ELB's name or the target group's ARN")
    public_url = serializers.CharField()
    desired_count = serializers.IntegerField(min_value=0)
    base_ami = serializers.CharField()
    last_baked_ami = serializers.CharField(allow_blank=True)
    recipe = serializers.CharField()
    four_eyes = serializers.BooleanField()
    gate_timeout = serializers.IntegerField(min_value=0, help_text="seconds")
    deploy_groups = serializers.ListField(child=serializers.CharField(), help_text=(
        "only deployers in one of these groups may start, cancel, retry or roll back here; empty: every deployer"))
    verify_groups = serializers.ListField(child=serializers.CharField(), help_text=(
        "only approvers in one of these groups may decide verify_directly; empty: every approver"))
    swap_groups = serializers.ListField(child=serializers.CharField(), help_text=(
        "only approvers in one of these groups may decide swap_elb; empty: every approver"))
    approvals_required = serializers.IntegerField(min_value=1, help_text="distinct approvals each gate needs")


class EnvironmentList(serializers.Serializer):
    environments = EnvironmentOut(many=True)


class ExplanationOut(serializers.Serializer):
    what = serializers.CharField(help_text="what failed, in plain words (\"revision v9 does not exist in the repository\")")
    retry = serializers.ChoiceField(choices=failures.RETRY, help_text="whether retrying the step can help")
    advice = serializers.CharField(help_text="what to do next (\"retrying will not help; roll back or cancel\")")


class StepOut(serializers.Serializer):
    key = serializers.CharField()
    kind = serializers.ChoiceField(choices=Step.Kind.choices)
    status = serializers.ChoiceField(choices=Step.Status.choices)
    attempts = serializers.IntegerField(min_value=0)
    error = serializers.CharField(allow_blank=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    waiting_for = serializers.CharField(allow_blank=True, help_text="what a running step waits for (AWS, or the sweep when its worker stopped renewing its lease), or "
                                        "why a pending step is to run again; empty otherwise")
    deadline = serializers.DateTimeField(allow_null=True, help_text="until when it waits (a running step or an open gate)")
    label = serializers.ChoiceField(choices=selectors.TIMELINE_LABELS, help_text=(
        "what the release page reads: the status, except \"skipped\" for a step that never ran in a release that is "
        "over (or rolling back), \"cancelled\" for a gate closed by a cancel or a rollback, \"rejected\" for a "
        "rejected gate (their `status` stays `pending` or `failed`)"))
    explanation = ExplanationOut(allow_null=True, help_text=(
        "a failed step (not a gate) in plain words, as the release page says it; null otherwise. `error` keeps the raw "
        "output"))


class DecisionOut(serializers.Serializer):
    by = serializers.CharField(help_text="who decided; `greenlight` when the gate timed out")
    decision = serializers.ChoiceField(choices=Approval.Decision.choices)
    comment = serializers.CharField(allow_blank=True)
    at = serializers.DateTimeField()


class GateOut(serializers.Serializer):
    key = serializers.CharField()
    status = serializers.ChoiceField(choices=Step.Status.choices)
    deadline = serializers.DateTimeField(allow_null=True)
    card = serializers.JSONField(help_text="what the person deciding sees: the direct URL and smoke results, or old vs new")
    decisions = DecisionOut(many=True)
    groups = serializers.ListField(child=serializers.CharField(), help_text=(
        "who may decide it: approvers in one of these groups (the environment's, as they are now); empty: every approver"))
    approvals_required = serializers.IntegerField(min_value=1, help_text=(
        "distinct approvals it needs (frozen with the release); one rejection rejects it"))
    assignee = serializers.CharField(allow_null=True, help_text="who has taken it (\"Assign to me\"): not a lock")


class InstanceOut(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField(allow_blank=True)
    role = serializers.ChoiceField(choices=Instance.Role.choices)
    slot = serializers.CharField(allow_blank=True)
    address = serializers.CharField(allow_blank=True)
    state = serializers.CharField(allow_blank=True)


class HistoryOut(serializers.Serializer):
    at = serializers.DateTimeField()
    step = serializers.CharField(allow_null=True, help_text="null for the release's own status")
    action = serializers.CharField()
    to = serializers.CharField()
    reason = serializers.CharField(allow_blank=True)
    by = serializers.CharField()

    def get_fields(self):
        # `from` is a Python keyword, so it cannot be declared above
        return {**super().get_fields(), "from": serializers.CharField()}


class CommitOut(serializers.Serializer):
    sha = serializers.CharField()
    subject = serializers.CharField(allow_blank=True)
    author = serializers.CharField(allow_blank=True)
    date = serializers.CharField(help_text="ISO 8601, the author's")


class ChangesOut(serializers.Serializer):
    to = serializers.CharField(help_text="the release's revision")
    commits = CommitOut(many=True, help_text="newest first, at most 50")
    more = serializers.BooleanField(help_text="there were more than those listed")
    error = serializers.CharField(allow_blank=True, help_text="why the commits could not be read, if so")
    from_release = serializers.IntegerField(allow_null=True, help_text="the release that was running")

    def get_fields(self):  # "from" is a keyword in Python
        fields = super().get_fields()
        fields["from"] = serializers.CharField(allow_blank=True, help_text="the revision that was running; empty for none")
        return fields


class ReleaseOut(serializers.Serializer):
    id = serializers.IntegerField()
    uuid = serializers.UUIDField(help_text="the release's identity in AWS: the value of its instances' and image's "
                                 "greenlight:release tag, and part of its image's name")
    environment = serializers.CharField()
    revision = serializers.CharField()
    strategy = serializers.ChoiceField(choices=Release.Strategy.choices)
    fleet_size = serializers.IntegerField(min_value=1)
    status = serializers.ChoiceField(choices=Release.Status.choices)
    error = serializers.CharField(allow_blank=True)
    cancel_requested = serializers.BooleanField()
    actions = serializers.ListField(child=serializers.ChoiceField(choices=transitions.PERSON_ACTIONS),
                                    help_text="what a person may ask of it now")
    requested_by = serializers.CharField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    log_seq = serializers.IntegerField(min_value=0, help_text="the last log line's sequence number")
    image = serializers.CharField(allow_blank=True, help_text="the AMI it baked, once it has")
    revision_checked = serializers.BooleanField(
        allow_null=True, help_text="whether the repository was asked for the revision when it was created: false when it "
                                   "could not be reached (\"revision not checked\"); null when nobody asked")
    changes = ChangesOut(allow_null=True, help_text="the commits between what ran and this revision, frozen at creation; "
                                                   "null when the revision was not checked")
    steps = StepOut(many=True)
    history = HistoryOut(many=True)
    gates = GateOut(many=True)
    instances = InstanceOut(many=True)


class CheckOut(serializers.Serializer):
    name = serializers.CharField(help_text="what was checked: credentials, load balancer, subnets, may RunInstances, ssh...")
    status = serializers.ChoiceField(choices=["ok", "warning", "failed"])
    message = serializers.CharField(allow_blank=True)
    fix = serializers.CharField(allow_blank=True, help_text="what to do, when it is not ok")


class PreflightOut(serializers.Serializer):
    environment = serializers.CharField()
    ok = serializers.BooleanField(help_text="no check failed (warnings allowed)")
    checks = CheckOut(many=True)


class LogLineOut(serializers.Serializer):
    seq = serializers.IntegerField(min_value=1)
    step = serializers.CharField()
    host = serializers.CharField(allow_blank=True)
    stream = serializers.CharField(help_text="stdout, stderr or info")
    text = serializers.CharField(allow_blank=True)
    at = serializers.DateTimeField()


class LogPage(serializers.Serializer):
    lines = LogLineOut(many=True)
    next = serializers.IntegerField(help_text="the last line's seq: ask again with after=next")


class AuditEventOut(serializers.Serializer):
    id = serializers.IntegerField()
    at = serializers.DateTimeField()
    actor = serializers.CharField()
    source_ip = serializers.CharField(allow_null=True)
    action = serializers.CharField()
    target = serializers.CharField(allow_blank=True)
    environment = serializers.CharField(allow_null=True)
    release = serializers.IntegerField(allow_null=True)
    details = serializers.JSONField()
    seq = serializers.IntegerField(min_value=1, help_text="position in the chain, from 1")
    prev_hash = serializers.CharField()
    hash = serializers.CharField()


class ChainOut(serializers.Serializer):
    verified = serializers.BooleanField()
    events = serializers.IntegerField(min_value=0)
    summary = serializers.CharField()
    broken_at = serializers.IntegerField(allow_null=True, help_text="the first event that does not verify")
    problem = serializers.CharField(allow_null=True, help_text="edited, deleted, inserted or reordered")


class AuditPage(serializers.Serializer):
    events = AuditEventOut(many=True)
    next_offset = serializers.IntegerField(allow_null=True, help_text="ask again with offset=next_offset; null on the last page")
    chain = ChainOut()


# -- requests ----------------------------------------------------------------


class ReleaseIn(serializers.Serializer):
    environment = serializers.CharField(help_text="the environment's name")
    revision = serializers.CharField(help_text="a branch, tag or commit of the environment's repository")
    strategy = serializers.ChoiceField(choices=Release.Strategy.choices, required=False, default=Release.Strategy.BAKE)
    clone_count = serializers.IntegerField(
        required=False, min_value=1, max_value=50,
        help_text="the size of the new fleet, the canary included; default: the environment's desired_count")


class PreflightIn(serializers.Serializer):
    revision = serializers.CharField(required=False, help_text="also check that the repository has it")
    strategy = serializers.ChoiceField(choices=Release.Strategy.choices, required=False,
                                       help_text="the image it launches from must be available")


class CommentIn(serializers.Serializer):
    comment = serializers.CharField(required=False, allow_blank=True, max_length=services.COMMENT_LIMIT)


# -- the operations ----------------------------------------------------------

def _int(minimum: int, maximum: int = params.MAX_WHOLE) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


RELEASE_ID = OpenApiParameter("release_id", _int(1), OpenApiParameter.PATH, description="the release's id")
GATE_KEY = OpenApiParameter("key", {"type": "string", "pattern": "^[^/]+$"}, OpenApiParameter.PATH,
                            description="the gate: verify_directly or swap_elb (another key is a 404)")
AFTER = OpenApiParameter("after", _int(0), description="only lines after this sequence number (default 0)")
LIMIT = OpenApiParameter("limit", _int(1), description="at most this many lines (default 5000; more is taken as 5000)")

READ = {**UNAUTHENTICATED, **NO_ROLE}


def _filter(name: str, description: str, type_=str) -> OpenApiParameter:
    return OpenApiParameter(name, type_, description=description)


environment_list = extend_schema(
    operation_id="environment_list",
    summary="The environments", tags=["environments"],
    responses={200: EnvironmentList, **READ},
)

class PreflightRefused(Error):
    checks = CheckOut(many=True, required=False, help_text="when preflight failed: every check, as the preflight answers them")


release_create = extend_schema(
    operation_id="release_create",
    summary="Start a release", tags=["releases"],
    description="A worker runs the environment's preflight first (where the server has PREFLIGHT_BEFORE_RELEASE on, "
                "the default); its plan is frozen then, and a worker starts it. Needs the deployer role.",
    request={"application/json": ReleaseIn},
    responses={201: ReleaseOut, **BAD_INPUT, **UNAUTHENTICATED, **NO_ROLE,
               **{409: OpenApiResponse(PreflightRefused, description=(
                   "the environment has an active release already (its id is in `release`), or its preflight failed "
                   "(every check is in `checks`)"))}},
    examples=[OpenApiExample("a release", value={"environment": "prepan", "revision": "v2"}, request_only=True)],
)

ENVIRONMENT_NAME = OpenApiParameter("name", {"type": "string", "pattern": "^[^/]+$"}, OpenApiParameter.PATH,
                                    description="the environment's name")

environment_preflight = extend_schema(
    operation_id="environment_preflight",
    summary="Check an environment before a release", tags=["environments"],
    description="A worker runs every check a release depends on (credentials, load balancer, subnets, security "
                "groups, key pair and key file, images, DryRun permissions, the repository, SSH to one current "
                "instance) and changes nothing. Needs the deployer role: it calls AWS with the workers' credentials.",
    parameters=[ENVIRONMENT_NAME],
    request={"application/json": PreflightIn},
    responses={200: PreflightOut, **BAD_INPUT, **UNAUTHENTICATED, **NO_ROLE,
               404: _error("there is no such environment")},
    examples=[OpenApiExample("a release's preflight", value={"revision": "v2", "strategy": "bake"}, request_only=True)],
)

release_detail = extend_schema(
    operation_id="release_detail",
    summary="A release", tags=["releases"],
    description="Its status, what a person may ask of it now, its steps (with what a step waits for, and until when, "
                "and what the release page reads: `label`, and a failure in plain words, `explanation`), "
                "its gates with their cards, its instances and its history.",
    parameters=[RELEASE_ID],
    responses={200: ReleaseOut, **READ, **UNKNOWN_RELEASE},
)


def gate_decision(verb: str):
    return extend_schema(
        operation_id=f"gate_{verb}", summary=f"{verb.capitalize()} an open gate", tags=["gates"],
        description="Needs the approver role, one of the gate's groups where the environment names some (`groups`), "
                    "and, under four eyes, not to have started the release. "
                    + ("The gate moves on with its `approvals_required`-th distinct approval; before that it stays "
                       "open. A second approval by the same person is a 409." if verb == "approve" else
                       "One rejection rejects the gate at once, whatever approvals it had, and rolls the release back."),
        parameters=[RELEASE_ID, GATE_KEY],
        request={"application/json": CommentIn},
        responses={200: ReleaseOut, **BAD_INPUT, **UNAUTHENTICATED, **UNKNOWN_RELEASE, **CONFLICT,
                   403: _error("without the approver role, outside the gate's groups (named), or the person who "
                               "started the release under four eyes")},
    )


GATE_ASSIGNEE = dict(
    parameters=[RELEASE_ID, GATE_KEY], request=None,
    responses={200: ReleaseOut, **UNAUTHENTICATED, **NO_ROLE, **UNKNOWN_RELEASE,
               409: _error("the gate is not open, or (POST) you have it already, or (DELETE) nobody has it")},
)
gate_assign = extend_schema(
    methods=["POST"], operation_id="gate_assign", summary="Take an open gate (Assign to me)", tags=["gates"],
    description="The signed-in person takes the gate: shown to everyone and notified, not a lock (anyone else who "
                "may decide it still may, or take it over). Needs the approver role, one of the gate's groups where "
                "the environment names some, and, under four eyes, not to have started the release. No body.",
    **GATE_ASSIGNEE,
)
gate_unassign = extend_schema(
    methods=["DELETE"], operation_id="gate_unassign", summary="Give up an open gate (nobody has it)", tags=["gates"],
    description="Whoever may decide the gate may say nobody has it. No body.",
    **GATE_ASSIGNEE,
)


def release_action(action: str, what: str):
    return extend_schema(
        operation_id=f"release_{action}", summary=what, tags=["releases"],
        description="Needs the deployer role. No body.",
        parameters=[RELEASE_ID],
        request=None,
        responses={200: ReleaseOut, **UNAUTHENTICATED, **NO_ROLE, **UNKNOWN_RELEASE, **CONFLICT},
    )


release_logs = extend_schema(
    operation_id="release_logs",
    summary="A release's log lines", tags=["releases"],
    description="Lines in sequence order, secrets redacted; page with after=next.",
    parameters=[RELEASE_ID, AFTER, LIMIT],
    responses={200: LogPage, **BAD_INPUT, **READ, **UNKNOWN_RELEASE},
)

audit_list = extend_schema(
    operation_id="audit_list",
    summary="The audit trail", tags=["audit"],
    description="Every event, newest first, a page of 100 at a time, with whether the hash chain verifies.",
    parameters=[
        _filter("environment", "an environment's name"),
        _filter("actor", "who did it (a username, or greenlight)"),
        _filter("action", "an action or its start, like release. or gate.approve"),
        _filter("release", "a release's id", _int(1)),
        _filter("since", "from this time on (ISO 8601, like 2026-11-29T10:00:00Z)", OpenApiTypes.DATETIME),
        _filter("until", "before this time (ISO 8601)", OpenApiTypes.DATETIME),
        _filter("offset", "skip this many events (default 0)", _int(0)),
    ],
    responses={200: AuditPage, **BAD_INPUT, **READ},
)


def closed_request_bodies(result, generator, request, public):
    """Starting a release refuses a field it does not know (400 "unknown
    fields: ..."), so its body's schema allows no other properties. (A gate's
    decision reads `comment` and ignores the rest.)"""
    schemas = result.get("components", {}).get("schemas", {})
    for name in ("ReleaseInRequest", "PreflightInRequest"):
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    return result


class SchemaView(SpectacularAPIView):
    """/api/schema/: YAML, or JSON with ?format=json. Its errors are JSON like
    every other API answer's, not YAML in the schema's media type."""

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = "application/json"
        return response
