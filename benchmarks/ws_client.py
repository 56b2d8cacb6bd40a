"""A websocket client for `make bench`, in a process of its own as a browser is.

    python -m benchmarks.ws_client URL COOKIE ORIGIN LINES TIMEOUT

Prints "ready" once connected, then reads log events until LINES distinct
sequence numbers arrived (or TIMEOUT seconds passed) and prints one JSON
object: how many arrived, duplicates, the wall-clock time of the last one,
and, for lines whose text is a wall-clock time (the latency run), how long
each took to arrive.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect


async def main(url: str, cookie: str, origin: str, lines: int, timeout: float) -> dict:
    seen: set[int] = set()
    duplicates, latencies, last_at = 0, [], None
    async with connect(url, additional_headers={"Cookie": cookie}, origin=origin, max_size=None) as ws:
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        try:
            while len(seen) < lines:
                message = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                now = time.time()
                event = json.loads(message)
                if event.get("type") != "log":
                    continue
                for line in event["lines"]:
                    duplicates += line["seq"] in seen
                    seen.add(line["seq"])
                    try:
                        latencies.append(now - float(line["text"]))
                    except ValueError:
                        pass
                last_at = now
        except TimeoutError:
            pass
    return {"received": len(seen), "duplicates": duplicates, "last_at": last_at, "latencies": latencies}


if __name__ == "__main__":
    url, cookie, origin, lines, timeout = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(url, cookie, origin, int(lines), float(timeout)))), flush=True)
