"""An HTTP load balancer that follows a classic ELB, or an ELBv2 target group, in moto.

moto records which instances are registered but routes nothing and
health-checks nothing. This does both, on a loopback port: it re-reads the
ELB (or the target group) through the same API a user would, health-checks
every registered instance on the health-check target, routes only to healthy
ones (round robin), and drains an instance that is deregistered: no new
requests, in-flight ones finish, and after the connection-draining timeout
(the target group's deregistration delay) whatever is still open is cut.

In the `fast` timings profile the interval and thresholds are the sandbox's
own (AWS will not accept an interval under five seconds, which would make
every test slow); in the `aws` profile they are the load balancer's own,
multiplied by the time scale, as are the draining timeouts in both.

A target group's targets go through the states ELBv2 reports: `initial`
until the first verdict, then `healthy` or `unhealthy`; a deregistered one
is `draining` for the whole deregistration delay (ELBv2 waits it out even
when nothing is in flight) and then gone. A classic ELB's drain ends as soon
as nothing is in flight, or at the timeout.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.exceptions import BotoCoreError, ClientError

from .. import aws

log = logging.getLogger("sandbox.balancer")
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailers", "transfer-encoding", "upgrade",
}
# A scaled timeout (5 s at 0.02 is 0.1 s) would fail healthy backends on a busy
# test machine; the timeout only decides how long a hung backend is waited for.
MIN_PROBE_TIMEOUT = 1.0
REFRESH_ATTRIBUTES = 2.0  # seconds between re-reads of the draining attribute


@dataclass
class Backend:
    instance_id: str
    address: str
    port: int
    state: str = "initial"  # initial, healthy or unhealthy, as ELBv2 names them
    ok_streak: int = 0
    fail_streak: int = 0
    failure: tuple[str, str] = ("Target.FailedHealthChecks", "Health checks failed")
    draining_until: float | None = None  # set when deregistered
    in_flight: set = field(default_factory=set)  # open backend connections

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    @property
    def routable(self) -> bool:
        return self.healthy and self.draining_until is None


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 0.5
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


class Balancer:
    def __init__(
        self,
        *,
        account: aws.Account,
        name: str,
        target_group_name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        health: HealthSettings = HealthSettings(),
        health_from_lb: bool = False,
        scale: float = 1.0,
        follow_interval: float = 0.25,
    ):
        self.account = account
        self.name = name  # the classic ELB's name, or the ALB's
        self.target_group_name = target_group_name
        self.target_group_arn: str | None = None  # found once the group exists
        self.kind = "alb" if target_group_name else "classic"
        self.health = health
        self.health_from_lb = health_from_lb
        self.scale = scale
        self.follow_interval = follow_interval
        self.backends: dict[str, Backend] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.health_path = "/health"
        self.health_port: int | None = None  # None: the traffic port
        self.instance_port = 80
        self.draining_timeout = 300.0 * scale
        self._rr = itertools.count()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._ec2 = aws.client(self.account, "ec2")
        self._elb = aws.client(self.account, "elbv2" if self.kind == "alb" else "elb")
        for target in (self._server.serve_forever, self._follow, self._check_health):
            thread = threading.Thread(target=target, name=f"lb-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- what the load balancer says -------------------------------------------

    def _follow(self) -> None:
        last_attributes = 0.0
        while not self.stopping.is_set():
            refresh = time.monotonic() - last_attributes > REFRESH_ATTRIBUTES
            try:
                registered = self._read_alb(refresh) if self.kind == "alb" else self._read_classic(refresh)
                self._apply(registered)
                if refresh:
                    last_attributes = time.monotonic()
            except (BotoCoreError, ClientError) as exc:
                log.debug("cannot read load balancer %s: %s", self.name, exc)
            self._finish_draining()  # here, not with the checks: an interval can be 30 s
            self.stopping.wait(self.follow_interval)

    def _lb_health(self, interval, timeout, healthy, unhealthy) -> None:
        if self.health_from_lb:
            self.health = HealthSettings(
                interval=float(interval) * self.scale,
                timeout=max(float(timeout) * self.scale, MIN_PROBE_TIMEOUT),
                healthy_threshold=int(healthy),
                unhealthy_threshold=int(unhealthy),
            )

    def _read_classic(self, refresh_attributes: bool) -> dict[str, int]:
        """Registered instance id -> port, from the classic ELB."""
        try:
            lb = self._elb.describe_load_balancers(LoadBalancerNames=[self.name])["LoadBalancerDescriptions"][0]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "LoadBalancerNotFound":
                return {}
            raise
        if lb["ListenerDescriptions"]:
            self.instance_port = lb["ListenerDescriptions"][0]["Listener"]["InstancePort"]
        check = lb.get("HealthCheck", {})
        target = check.get("Target", "")
        if target.upper().startswith("HTTP") and "/" in target:
            self.health_path = "/" + target.split("/", 1)[1]
        if check.get("Interval"):
            self._lb_health(check["Interval"], check["Timeout"], check["HealthyThreshold"], check["UnhealthyThreshold"])
        if refresh_attributes:
            attributes = self._elb.describe_load_balancer_attributes(LoadBalancerName=self.name)
            draining = attributes["LoadBalancerAttributes"].get("ConnectionDraining", {})
            self.draining_timeout = float(draining.get("Timeout", 300)) * self.scale if draining.get("Enabled") else 0.0
        return {i["InstanceId"]: self.instance_port for i in lb["Instances"]}

    def _read_alb(self, refresh_attributes: bool) -> dict[str, int]:
        """Registered target id -> port, from the target group."""
        try:
            kwargs = {"TargetGroupArns": [self.target_group_arn]} if self.target_group_arn else {"Names": [self.target_group_name]}
            group = self._elb.describe_target_groups(**kwargs)["TargetGroups"][0]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "TargetGroupNotFound":
                return {}
            raise
        self.target_group_arn = group["TargetGroupArn"]
        self.instance_port = group["Port"]
        self.health_path = group.get("HealthCheckPath") or "/"
        port = group.get("HealthCheckPort", "traffic-port")
        self.health_port = int(port) if port.isdigit() else None
        self._lb_health(group["HealthCheckIntervalSeconds"], group["HealthCheckTimeoutSeconds"],
                        group["HealthyThresholdCount"], group["UnhealthyThresholdCount"])
        if refresh_attributes:
            attributes = self._elb.describe_target_group_attributes(TargetGroupArn=self.target_group_arn)["Attributes"]
            values = {a["Key"]: a["Value"] for a in attributes}
            self.draining_timeout = float(values.get("deregistration_delay.timeout_seconds", 300)) * self.scale
        # what is draining is listed too, by the sandbox's own hook: not registered
        described = self._elb.describe_target_health(TargetGroupArn=self.target_group_arn)["TargetHealthDescriptions"]
        return {t["Target"]["Id"]: int(t["Target"].get("Port") or self.instance_port)
                for t in described if t["TargetHealth"]["State"] != "draining"}

    def _addresses(self, ids: set[str]) -> dict[str, str]:
        try:
            reservations = self._ec2.describe_instances(InstanceIds=sorted(ids))["Reservations"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
                return {}  # too new for EC2 to know it yet: look again on the next round
            raise
        return {i["InstanceId"]: i.get("PrivateIpAddress", "") for r in reservations for i in r["Instances"]}

    def _apply(self, registered: dict[str, int]) -> None:
        with self.lock:
            known = set(self.backends)
        added = set(registered) - known
        addresses = self._addresses(added) if added else {}
        now = time.monotonic()
        with self.lock:
            for instance_id in added:
                if addresses.get(instance_id):
                    self.backends[instance_id] = Backend(instance_id, addresses[instance_id], registered[instance_id])
                    log.info("%s registered with %s (%s)", instance_id, self.name, addresses[instance_id])
            for instance_id, backend in self.backends.items():
                if instance_id not in registered and backend.draining_until is None:
                    backend.draining_until = now + self.draining_timeout
                    log.info("%s deregistered from %s; draining", instance_id, self.name)
                elif instance_id in registered and backend.draining_until is not None:
                    backend.draining_until = None  # registered again while draining

    # -- health ----------------------------------------------------------------

    def _probe(self, backend: Backend) -> tuple[str, str] | None:
        """None if healthy, else ELBv2's reason code and description."""
        port = self.health_port or backend.port
        connection = http.client.HTTPConnection(backend.address, port, timeout=self.health.timeout)
        try:
            connection.request("GET", self.health_path, headers={"User-Agent": "ELB-HealthChecker/2.0"})
            status = connection.getresponse().status
            if status == 200:
                return None
            return ("Target.ResponseCodeMismatch", f"Health checks failed with these codes: [{status}]")
        except TimeoutError:
            return ("Target.Timeout", "Request timed out")
        except OSError:
            return ("Target.FailedHealthChecks", "Health checks failed")
        finally:
            connection.close()

    def _record(self, backend: Backend, failure: tuple[str, str] | None) -> None:
        health = self.health
        if failure is None:
            backend.ok_streak, backend.fail_streak = backend.ok_streak + 1, 0
            if not backend.healthy and backend.ok_streak >= health.healthy_threshold:
                backend.state = "healthy"
                log.info("%s is healthy", backend.instance_id)
        else:
            backend.fail_streak, backend.ok_streak = backend.fail_streak + 1, 0
            backend.failure = failure
            if backend.state != "unhealthy" and backend.fail_streak >= health.unhealthy_threshold:
                backend.state = "unhealthy"
                log.info("%s is unhealthy", backend.instance_id)

    def _check_health(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            with self.lock:
                backends = [b for b in self.backends.values() if b.draining_until is None]
            for backend in backends:
                failure = self._probe(backend)
                with self.lock:
                    self._record(backend, failure)
            # every backend is checked once per interval, however long the checks took
            self.stopping.wait(max(self.health.interval - (time.monotonic() - started), 0.01))

    def _finish_draining(self) -> None:
        now = time.monotonic()
        with self.lock:
            for instance_id, backend in list(self.backends.items()):
                if backend.draining_until is None:
                    continue
                if backend.in_flight and now >= backend.draining_until:
                    for connection in list(backend.in_flight):
                        if connection.sock:  # draining timed out: cut what is left
                            try:  # shutdown, not close: it wakes the thread blocked reading
                                connection.sock.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                # a classic ELB deregisters as soon as nothing is in flight; ELBv2 waits out the delay
                early = self.kind == "classic" and not backend.in_flight
                if early or now >= backend.draining_until:
                    del self.backends[instance_id]
                    log.info("%s drained from %s", instance_id, self.name)

    def state_of(self, instance_id: str) -> tuple[str, str] | None:
        """The health a classic ELB would report for a registered instance."""
        with self.lock:
            backend = self.backends.get(instance_id)
            if backend is None:
                return ("OutOfService", "Instance registration is still in progress.")
            if backend.healthy:
                return ("InService", "N/A")
            return ("OutOfService", "Instance has failed at least the UnhealthyThreshold number of health checks consecutively.")

    def target_state(self, target_id: str, registered: bool) -> tuple[str, str | None, str | None] | None:
        """The (State, Reason, Description) ELBv2 would report for a target,
        or None where moto's own answer (unused: not registered) is right."""
        with self.lock:
            backend = self.backends.get(target_id)
            if not registered:
                if backend is not None:  # draining, or about to be on the next follow
                    return ("draining", "Target.DeregistrationInProgress", "Target deregistration is in progress")
                return None
            if backend is None or backend.draining_until is not None:
                return ("initial", "Elb.RegistrationInProgress", "Target registration is in progress")
            if backend.state == "initial":
                return ("initial", "Elb.InitialHealthChecking", "Initial health checks in progress")
            if backend.healthy:
                return ("healthy", None, None)
            return ("unhealthy", *backend.failure)

    def draining(self, registered: set[str]) -> list[tuple[str, int]]:
        """Targets still held here that the group no longer has (draining,
        or deregistered since the last follow and about to drain)."""
        with self.lock:
            return sorted((b.instance_id, b.port) for b in self.backends.values()
                          if b.draining_until is not None or b.instance_id not in registered)

    def routable(self) -> list[str]:
        with self.lock:
            return sorted(b.instance_id for b in self.backends.values() if b.routable)

    # -- the proxy -------------------------------------------------------------

    def _checkout(self) -> tuple[Backend, http.client.HTTPConnection] | None:
        """Pick a backend and count the request against it, in one step, so a
        backend cannot finish draining between the choice and the request."""
        with self.lock:
            candidates = sorted((b for b in self.backends.values() if b.routable), key=lambda b: b.instance_id)
            if not candidates:
                return None
            backend = candidates[next(self._rr) % len(candidates)]
            connection = http.client.HTTPConnection(backend.address, backend.port, timeout=60)
            backend.in_flight.add(connection)
            return backend, connection

    def _handler_class(self):
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "greenlight-sandbox-elb"

            def _proxy(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["X-Forwarded-For"] = self.client_address[0]
                headers["X-Forwarded-Proto"] = "http"
                checked_out = balancer._checkout()
                if checked_out is None:
                    return self._error(503, "no healthy backend")
                backend, connection = checked_out
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    return self._error(502, "backend connection failed")
                finally:
                    with balancer.lock:
                        backend.in_flight.discard(connection)
                    connection.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status, text):
                data = f"{status} {text}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _proxy

            def log_message(self, format, *args):
                log.debug("%s %s", self.address_string(), format % args)

        return Handler
