"""Bounded load on loopback: clients polling runs while runs are submitted.

Run: `.venv/bin/python benchmarks/load_test.py [--runs 200] [--pollers 50] [--submitters 10] [--postgres]`

Starts the embedded stack (SQLite, or a throwaway PostgreSQL server with --postgres) on
free loopback ports, uploads the demo dataset, then at the same time:
- `--pollers` clients loop over GET /v1/runs?project=load and GET /v1/runs/{id} of a run
  already submitted;
- `--submitters` clients POST `--runs` runs, each with its own Idempotency-Key, retrying
  on network errors and 5xx; one submission in five is sent a second time with the same
  key, as a client does whose first answer was lost.
It then checks that exactly `--runs` runs exist, one per key, each with a workflow in
Temporal of the same id (no run lost, none duplicated), cancels them all, waits for them
to end, stops the stack, and prints p50/p95/p99 latencies per request kind as JSON.
Everything talks to 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from benchmarks.demo_setup import demo_inputs, loopback_settings  # noqa: E402
from cli.api_client import ApiClient  # noqa: E402

PROJECT = "load"
TERMINAL = {"succeeded", "failed", "cancelled"}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


class Recorder:
    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: dict[str, int] = defaultdict(int)

    async def call(self, client: httpx.AsyncClient, kind: str, method: str, url: str, **kw) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError:
            self.errors[kind] += 1
            return None
        self.latency[kind].append(time.perf_counter() - t)
        self.status[kind][r.status_code] += 1
        return r

    def summary(self) -> dict:
        out = {}
        for kind, xs in sorted(self.latency.items()):
            out[kind] = {
                "requests": len(xs),
                "p50_ms": round(1000 * statistics.median(xs), 1),
                "p95_ms": round(1000 * percentile(xs, 95), 1),
                "p99_ms": round(1000 * percentile(xs, 99), 1),
                "max_ms": round(1000 * max(xs), 1),
                "status": dict(sorted(self.status[kind].items())),
                "network_errors": self.errors[kind],
            }
        return out


async def submit_all(api: str, spec: dict, n: int, submitters: int, rec: Recorder, submitted: dict[str, str]) -> int:
    """POST n runs; returns how many answers said 'already exists' (200)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    replays = 0

    async def submitter(client: httpx.AsyncClient):
        nonlocal replays
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            key = f"load-{i:04d}"
            body = {**spec, "name": f"load-{i:04d}"}
            sends = 2 if i % 5 == 0 else 1
            for _ in range(sends):
                for _attempt in range(6):
                    r = await rec.call(client, "POST /v1/runs", "POST", "/v1/runs", json=body, headers={"Idempotency-Key": key})
                    if r is not None and r.status_code < 500:
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise SystemExit(f"submission {key} failed six times")
                if r.status_code not in (200, 201):
                    raise SystemExit(f"submission {key} refused: {r.status_code} {r.text}")
                if r.status_code == 200:
                    replays += 1
                run_id = r.json()["id"]
                if submitted.setdefault(key, run_id) != run_id:
                    raise SystemExit(f"key {key} answered with two runs: {submitted[key]} and {run_id}")

    async with httpx.AsyncClient(base_url=api, timeout=60, limits=httpx.Limits(max_connections=submitters)) as client:
        await asyncio.gather(*(submitter(client) for _ in range(submitters)))
    return replays


async def poll_until(api: str, pollers: int, rec: Recorder, submitted: dict[str, str], done: asyncio.Event) -> None:
    async def poller(client: httpx.AsyncClient, seed: int):
        rng = random.Random(seed)
        while not done.is_set():
            await rec.call(client, "GET /v1/runs", "GET", "/v1/runs", params={"project": PROJECT, "limit": 50})
            ids = list(submitted.values())
            if ids:
                await rec.call(client, "GET /v1/runs/{id}", "GET", f"/v1/runs/{rng.choice(ids)}")

    async with httpx.AsyncClient(base_url=api, timeout=60, limits=httpx.Limits(max_connections=pollers)) as client:
        await asyncio.gather(*(poller(client, s) for s in range(pollers)))


async def temporal_run_ids(settings) -> list[str]:
    from runtime.temporal import connect

    client = await connect(settings)
    return [wf.id async for wf in client.list_workflows(f"LocknProject = '{PROJECT}'")]


async def cancel_all(api: str, run_ids: list[str], rec: Recorder) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        sem = asyncio.Semaphore(20)

        async def cancel(run_id: str):
            async with sem:
                await rec.call(client, "POST /v1/runs/{id}/cancel", "POST", f"/v1/runs/{run_id}/cancel")

        await asyncio.gather(*(cancel(r) for r in run_ids))
        deadline = time.monotonic() + 600
        while True:
            runs = (await client.get("/v1/runs", params={"project": PROJECT, "limit": 1000})).json()["runs"]
            states: dict[str, int] = defaultdict(int)
            for r in runs:
                states[r["state"]] += 1
            if all(s in TERMINAL for s in states) or time.monotonic() > deadline:
                return dict(states)
            await asyncio.sleep(1)


async def load(settings, spec: dict, args) -> dict:
    rec = Recorder()
    submitted: dict[str, str] = {}
    done = asyncio.Event()
    api = settings.api_url
    t0 = time.perf_counter()
    pollers = asyncio.create_task(poll_until(api, args.pollers, rec, submitted, done))
    replays = await submit_all(api, spec, args.runs, args.submitters, rec, submitted)
    submit_s = time.perf_counter() - t0
    await asyncio.sleep(args.poll_after_s)  # keep polling while the workers take the runs up
    done.set()
    await pollers

    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        listed = (await client.get("/v1/runs", params={"project": PROJECT, "limit": 1000})).json()["runs"]
    db_ids = [r["id"] for r in listed]
    temporal_ids = await temporal_run_ids(settings)
    wanted = set(submitted.values())
    check = {
        "keys_submitted": args.runs,
        "distinct_runs_answered": len(wanted),
        "runs_in_db": len(db_ids),
        "duplicate_runs_in_db": len(db_ids) - len(set(db_ids)),
        "lost_runs_db": len(wanted - set(db_ids)),
        "extra_runs_db": len(set(db_ids) - wanted),
        "workflows_in_temporal": len(temporal_ids),
        "lost_runs_temporal": len(wanted - set(temporal_ids)),
        "extra_workflows_temporal": len(set(temporal_ids) - wanted),
        "replayed_submissions_answered_200": replays,
    }
    final_states = await cancel_all(api, list(wanted), rec)
    return {"check": check, "submit_wall_s": round(submit_s, 2), "final_states": final_states, "latency": rec.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--submitters", type=int, default=10)
    parser.add_argument("--poll-after-s", type=float, default=10.0, help="keep polling this long after the last submit")
    parser.add_argument("--postgres", action="store_true", help="metadata on a throwaway PostgreSQL server")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()

    from cli.stack import Stack

    with tempfile.TemporaryDirectory(prefix="lockn-load-") as tmp:
        tmp = Path(tmp)
        model, data, spec = demo_inputs(tmp)
        pg = None
        overrides = {}
        if args.postgres:
            from tests.postgres_server import PostgresServer

            pg = PostgresServer().start()
            overrides["database_url"] = pg.new_database()
        settings = loopback_settings(tmp / "home", 18600, **overrides)
        stack = Stack(settings)
        stack.start()
        stop = threading.Event()
        threading.Thread(target=lambda: [stack.watch_once() for _ in iter(lambda: stop.wait(0.1), True)], daemon=True).start()
        try:
            ApiClient(settings.api_url).wait_healthy(120)
            with open(data, "rb") as f:
                ds = httpx.post(f"{settings.api_url}/v1/datasets", params={"project": PROJECT}, files={"file": f}, timeout=60)
            ds.raise_for_status()
            body = spec.model_dump(mode="json") | {"project": PROJECT, "dataset": ds.json()["id"]}
            report = asyncio.run(load(settings, body, args))
        finally:
            stop.set()
            stack.stop()
            if pg:
                pg.stop()
    report["config"] = {
        "runs": args.runs, "pollers": args.pollers, "submitters": args.submitters,
        "database": "postgresql" if args.postgres else "sqlite", "cpu_count": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    c = report["check"]
    ok = c["runs_in_db"] == c["keys_submitted"] == c["workflows_in_temporal"] and not (
        c["duplicate_runs_in_db"] or c["lost_runs_db"] or c["lost_runs_temporal"] or c["extra_runs_db"]
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
