#!/usr/bin/env python3
"""The demo background worker: it proves it runs by touching a heartbeat file."""

import sys
import time

REVISION = "{revision}"

if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "worker.heartbeat"
    print(f"worker {REVISION} started", flush=True)
    while True:
        with open(path, "w") as heartbeat:
            heartbeat.write(f"{REVISION} {time.time():.0f}\n")
        time.sleep(1)
