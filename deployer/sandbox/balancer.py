"""An HTTP load balancer that follows a classic ELB's registrations in moto.

moto records which instances are registered with an ELB but routes nothing
and health-checks nothing. This does both, on a loopback port: it re-reads
the ELB through the same API a user would, health-checks every registered
instance on the ELB's health-check target, routes only to healthy ones
(round robin), and drains an instance that is deregistered: no new
requests, in-flight ones finish, and after the ELB's connection-draining
timeout whatever is still open is cut.

Interval and thresholds are the sandbox's own (AWS will not accept an
interval under five seconds, which would make every test slow).
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


@dataclass
class Backend:
    instance_id: str
    address: str
    port: int
    healthy: bool = False
    ok_streak: int = 0
    fail_streak: int = 0
    draining_until: float | None = None  # set when deregistered
    in_flight: set = field(default_factory=set)  # open backend connections

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
        host: str = "127.0.0.1",
        port: int = 0,
        health: HealthSettings = HealthSettings(),
        follow_interval: float = 0.25,
    ):
        self.account = account
        self.name = name
        self.health = health
        self.follow_interval = follow_interval
        self.backends: dict[str, Backend] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.health_path = "/health"
        self.instance_port = 80
        self.draining_timeout = 300.0
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
        self._elb = aws.client(self.account, "elb")
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

    # -- what the ELB says -----------------------------------------------------

    def _follow(self) -> None:
        last_attributes = 0.0
        while not self.stopping.is_set():
            try:
                self._sync(refresh_attributes=time.monotonic() - last_attributes > 2)
                last_attributes = time.monotonic() if time.monotonic() - last_attributes > 2 else last_attributes
            except (BotoCoreError, ClientError) as exc:
                log.debug("cannot read ELB %s: %s", self.name, exc)
            self.stopping.wait(self.follow_interval)

    def _sync(self, refresh_attributes: bool) -> None:
        try:
            described = self._elb.describe_load_balancers(LoadBalancerNames=[self.name])
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "LoadBalancerNotFound":
                registered = set()
                described = None
            else:
                raise
        if described:
            lb = described["LoadBalancerDescriptions"][0]
            registered = {i["InstanceId"] for i in lb["Instances"]}
            if lb["ListenerDescriptions"]:
                self.instance_port = lb["ListenerDescriptions"][0]["Listener"]["InstancePort"]
            target = lb.get("HealthCheck", {}).get("Target", "")
            if target.upper().startswith("HTTP") and "/" in target:
                self.health_path = "/" + target.split("/", 1)[1]
            if refresh_attributes:
                attributes = self._elb.describe_load_balancer_attributes(LoadBalancerName=self.name)
                draining = attributes["LoadBalancerAttributes"].get("ConnectionDraining", {})
                self.draining_timeout = float(draining.get("Timeout", 300)) if draining.get("Enabled") else 0.0
        with self.lock:
            known = set(self.backends)
        added = registered - known
        addresses = {}
        if added:
            reservations = self._ec2.describe_instances(InstanceIds=sorted(added))["Reservations"]
            for reservation in reservations:
                for instance in reservation["Instances"]:
                    addresses[instance["InstanceId"]] = instance.get("PrivateIpAddress", "")
        now = time.monotonic()
        with self.lock:
            for instance_id in added:
                if addresses.get(instance_id):
                    self.backends[instance_id] = Backend(instance_id, addresses[instance_id], self.instance_port)
                    log.info("%s registered with %s (%s)", instance_id, self.name, addresses[instance_id])
            for instance_id, backend in self.backends.items():
                if instance_id not in registered and backend.draining_until is None:
                    backend.draining_until = now + self.draining_timeout
                    log.info("%s deregistered from %s; draining", instance_id, self.name)
                elif instance_id in registered and backend.draining_until is not None:
                    backend.draining_until = None  # registered again while draining

    # -- health ----------------------------------------------------------------

    def _probe(self, backend: Backend) -> bool:
        connection = http.client.HTTPConnection(backend.address, backend.port, timeout=self.health.timeout)
        try:
            connection.request("GET", self.health_path, headers={"User-Agent": "ELB-HealthChecker/1.0"})
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def _check_health(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                backends = list(self.backends.values())
            for backend in backends:
                if backend.draining_until is not None:
                    continue
                ok = self._probe(backend)
                with self.lock:
                    if ok:
                        backend.ok_streak, backend.fail_streak = backend.ok_streak + 1, 0
                        if not backend.healthy and backend.ok_streak >= self.health.healthy_threshold:
                            backend.healthy = True
                            log.info("%s is healthy", backend.instance_id)
                    else:
                        backend.fail_streak, backend.ok_streak = backend.fail_streak + 1, 0
                        if backend.healthy and backend.fail_streak >= self.health.unhealthy_threshold:
                            backend.healthy = False
                            log.info("%s is unhealthy", backend.instance_id)
            self._finish_draining()
            self.stopping.wait(self.health.interval)

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
                if not backend.in_flight or now >= backend.draining_until:
                    del self.backends[instance_id]
                    log.info("%s drained from %s", instance_id, self.name)

    def state_of(self, instance_id: str) -> tuple[str, str] | None:
        """The health AWS would report for a registered instance."""
        with self.lock:
            backend = self.backends.get(instance_id)
            if backend is None:
                return ("OutOfService", "Instance registration is still in progress.")
            if backend.healthy:
                return ("InService", "N/A")
            return ("OutOfService", "Instance has failed at least the UnhealthyThreshold number of health checks consecutively.")

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
