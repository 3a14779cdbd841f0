#!/usr/bin/env python3
"""Follow one service through squire's catalog API with blocking queries.

    python3 examples/catalog_watch.py battle --admin 127.0.0.1:9901 --tag game

Prints one line per change to stdout, e.g.

    added battle-2 10.0.0.6:7000 healthy
    status battle-2 healthy -> draining
    removed battle-2

and progress (the first listing, squire unreachable and the retry delay) to
stderr. Exits 0 after --count changes, 130 on Ctrl-C, 2 when squire answers
the query is wrong (an unknown service, a bad filter). Standard library only.

The loop is Consul's blocking-query loop: ask with the index of the last
answer (`?index=N&wait=...`); squire answers when the index moves past N or
after `wait`. An index that goes backwards (squire restarted) or is not at
least 1 starts over from a plain listing; the previous instances are kept,
so what changed meanwhile is still printed. While squire is unreachable
(restarting, reloading) it retries with jittered exponential backoff.
"""

import argparse
import http.client
import json
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service")
    parser.add_argument("--admin", default="127.0.0.1:9901", help="squire's admin address")
    parser.add_argument("--count", type=int, default=0, help="exit after this many changes (0: never)")
    parser.add_argument("--wait", default="5m", help="longest wait of one blocking query (squire caps it at 10m)")
    parser.add_argument("--tag", action="append", default=[], help="only instances with this tag (repeatable)")
    parser.add_argument("--status", action="append", default=[], help="only instances with this status (repeatable)")
    parser.add_argument("--version", help="exact version, or a prefix ending in *")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata pair (repeatable)")
    return parser.parse_args()


def seconds(duration):
    """'30s', '5m', '250ms' as seconds (for the client's own timeout)."""
    for unit, factor in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if duration.endswith(unit) and duration[: -len(unit)].isdigit():
            return int(duration[: -len(unit)]) * factor
    raise SystemExit(f"--wait {duration!r}: expected e.g. 30s, 5m or 250ms")


class Refused(Exception):
    """squire answered that the query itself is wrong: retrying cannot help."""


def query(args, index):
    params = [("tag", t) for t in args.tag] + [("status", s) for s in args.status]
    if args.version is not None:
        params.append(("version", args.version))
    for pair in args.meta:
        key, _, value = pair.partition("=")
        params.append((f"meta.{key}", value))
    if index:
        params += [("index", str(index)), ("wait", args.wait)]
    service = urllib.parse.quote(args.service, safe="")
    url = f"http://{args.admin}/v1/catalog/{service}?{urllib.parse.urlencode(params)}"
    # squire may add up to wait/16 of jitter to the wait.
    timeout = seconds(args.wait) * 17 / 16 + 5 if index else 10
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        if 400 <= e.code < 500 and e.code != 429:
            raise Refused(f"{e.code}: {detail}") from None
        raise


def changes(before, after):
    """Lines describing how the instance set `before` became `after` (dicts by id)."""
    lines = []
    for id_, instance in after.items():
        old = before.get(id_)
        if old is None:
            lines.append(f"added {id_} {instance['host']}:{instance['port']} {status(instance)}")
        elif status(old) != status(instance):
            lines.append(f"status {id_} {status(old)} -> {status(instance)}")
    lines += [f"removed {id_}" for id_ in before if id_ not in after]
    return lines


def status(instance):
    # squire's finer state (warning, draining) first, as squire reads it.
    return instance.get("squire_status") or instance.get("status", "healthy")


def watch(args):
    index = 0
    known = None  # instances by id, None before the first listing
    printed = 0
    delay = BACKOFF_FIRST
    while True:
        try:
            answer = query(args, index)
        except Refused as e:
            print(f"squire refused the query: {e}", file=sys.stderr)
            return 2
        except (OSError, http.client.HTTPException, ValueError) as e:
            # Unreachable, reset, timed out, half an answer, a 5xx or 429
            # (urllib's errors are OSErrors): try again later.
            pause = delay * random.uniform(0.5, 1.0)
            print(f"squire at {args.admin} unreachable ({e}); retrying in {pause:.1f}s", file=sys.stderr, flush=True)
            time.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        delay = BACKOFF_FIRST
        new_index = answer.get("index", 0)
        if not isinstance(new_index, int) or new_index < 1:
            new_index = 1  # never block on a bad index: treat it as 1
        if new_index < index:
            print(f"index went back from {index} to {new_index} (squire restarted?); starting over", file=sys.stderr, flush=True)
            new_index = 0
        index = new_index
        current = {i["id"]: i for i in answer["instances"]}
        if known is None:
            print(f"watching {args.service} at index {index}: {len(current)} instance(s)", file=sys.stderr, flush=True)
        else:
            for line in changes(known, current):
                print(line, flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    return 0
        known = current


def main():
    args = parse_args()
    seconds(args.wait)  # refuse a bad --wait before the first query
    try:
        return watch(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
