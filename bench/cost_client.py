#!/usr/bin/env python3
"""bench/cost_client.py — a fixed number of requests for bench/cost.sh.

    cost_client.py URL MODE TAG COUNT CONNECTIONS BODY

Sends COUNT `POST URL` requests (JSON BODY) over CONNECTIONS kept-alive connections, one
thread each, as bench/wrk/post.lua builds them: MODE unique gives every request the
Idempotency-Key TAG-<connection>-<n> (the miss path), fixed gives all of them the key TAG
(the replay path), none sends no key (pass-through). Every request carries a unique
X-Bench-Seq. Exits non-zero, naming the first, when any answer is not 201.
"""

import http.client
import sys
import threading
import urllib.parse


def main() -> int:
    url, mode, tag, count, connections, body = sys.argv[1:7]
    count, connections = int(count), int(connections)
    parsed = urllib.parse.urlsplit(url)
    payload = body.encode()
    failures = []

    def worker(n: int, share: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        for i in range(share):
            seq = f"{tag}-{n}-{i}"
            headers = {"Content-Type": "application/json", "X-Bench-Seq": seq}
            if mode == "unique":
                headers["Idempotency-Key"] = seq
            elif mode == "fixed":
                headers["Idempotency-Key"] = tag
            conn.request("POST", parsed.path or "/", payload, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 201:
                failures.append(f"{seq}: {response.status}")
        conn.close()

    shares = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(n, s)) for n, s in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print(f"{len(failures)} of {count} answers were not 201, first {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
