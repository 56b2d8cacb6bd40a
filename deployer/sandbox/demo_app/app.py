#!/usr/bin/env python3
"""The demo web service that Greenlight deploys in the sandbox.

Standard library only, so a bare sandbox instance runs it. `/` names the
revision, `/health` answers 200, `/slow?seconds=N` holds a request open (to
watch a load balancer drain).
"""

import argparse
import html
import os
import socket
import sqlite3
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REVISION = "{revision}"


def read_config(path):
    config = {}
    with open(path) as lines:
        for line in lines:
            key, sep, value = line.strip().partition("=")
            if sep:
                config[key] = value
    return config


class Handler(BaseHTTPRequestHandler):
    server_version = "prepan-demo/" + REVISION

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/health":
            return self.reply(200, "ok\n", "text/plain")
        if url.path == "/slow":
            seconds = float(parse_qs(url.query).get("seconds", ["1"])[0])
            time.sleep(min(max(seconds, 0), 60))
            return self.reply(200, f"slow {REVISION} {INSTANCE_ID}\n", "text/plain")
        if url.path == "/":
            page = (
                "<!doctype html><title>prepan " + REVISION + "</title>"
                '<h1>prepan</h1><p>revision <b id="revision">' + REVISION + "</b>"
                ' served by <b id="instance">' + html.escape(INSTANCE_ID) + "</b></p>\n"
            )
            return self.reply(200, page, "text/html; charset=utf-8")
        return self.reply(404, "not found\n", "text/plain")

    def reply(self, status, body, content_type):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Revision", REVISION)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))


INSTANCE_ID = os.environ.get("INSTANCE_ID", socket.gethostname())


def deployed_revision(config_path):
    """The name it was deployed as (a tag may point at another's code)."""
    try:
        with open(os.path.join(os.path.dirname(config_path), "REVISION")) as marker:
            return marker.read().strip() or REVISION
    except OSError:
        return REVISION


def serve(config):
    address = (os.environ.get("INSTANCE_IP", "0.0.0.0"), int(config["port"]))
    deadline = time.monotonic() + 15
    while True:  # a restart may find the old process still letting go of the port
        try:
            server = ThreadingHTTPServer(address, Handler)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    server.daemon_threads = True
    print(f"prepan {REVISION} listening on {address[0]}:{address[1]}", flush=True)
    server.serve_forever()


def wait_ready(config, seconds=15):
    url = f"http://{os.environ.get('INSTANCE_IP', '127.0.0.1')}:{config['port']}/health"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200 and response.headers.get("X-Revision") == REVISION:
                    print(f"{REVISION} is up at {url}")
                    return 0
        except OSError:
            pass
        time.sleep(0.2)
    print(f"{REVISION} did not come up at {url} within {seconds}s", file=sys.stderr)
    return 1


def setup_db(config):
    with sqlite3.connect(config["db"]) as db:
        db.execute("CREATE TABLE IF NOT EXISTS deploys (revision TEXT, at REAL)")
        db.execute("INSERT INTO deploys VALUES (?, ?)", (REVISION, time.time()))
    print(f"database ready at {config['db']}")
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--setup-db", action="store_true")
    parser.add_argument("--wait-ready", action="store_true")
    args = parser.parse_args()
    config = read_config(args.config)
    global REVISION
    REVISION = deployed_revision(args.config)
    Handler.server_version = "prepan-demo/" + REVISION
    if args.setup_db:
        return setup_db(config)
    if args.wait_ready:
        return wait_ready(config)
    serve(config)


if __name__ == "__main__":
    sys.exit(main())
