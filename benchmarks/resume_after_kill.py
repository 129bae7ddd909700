"""Crash recovery: steps redone per SIGKILL of the GPU worker, and how fast training resumes.

Run: `.venv/bin/python benchmarks/resume_after_kill.py [--kills 3] [--heartbeat-timeout 5]`

Starts the embedded stack, submits one long run on a tiny model, and SIGKILLs worker_gpu
at points between checkpoints. For each kill it reports the step at the kill, the
checkpoint the retry resumed from (steps redone = the difference), the time from the
restarted worker process to its first resumed step, and from the kill to that step (which
includes Temporal's heartbeat timeout). For comparison: the time from a cold stack start
to the run's first step, and from a fresh worker process to the first step of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.demo_setup import demo_inputs, loopback_settings  # noqa: E402
from cli.api_client import ApiClient  # noqa: E402
from store.blocking import BlockingDatabase  # noqa: E402


def wait(predicate, timeout=300, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise SystemExit("timed out")


def first_progress_after(db: BlockingDatabase, run_id: str, t: float, above: int):
    for e in db.events(run_id):
        if e.kind == "progress" and e.ts > t and e.step and e.step > above:
            return e
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--chunk", type=int, default=100, help="checkpoint_every_steps")
    args = parser.parse_args()

    from cli.stack import Stack

    with tempfile.TemporaryDirectory(prefix="lockn-resume-") as tmp:
        tmp = Path(tmp)
        _, _, spec = demo_inputs(tmp)
        spec.hyperparameters.max_steps = args.chunk * (args.kills + 2)
        spec.checkpoint_every_steps = args.chunk
        settings = loopback_settings(
            tmp / "home", 18500, heartbeat_every_s=1.0, heartbeat_timeout_s=args.heartbeat_timeout, progress_every_s=0.05
        )
        stack = Stack(settings)
        t_start = time.time()
        stack.start()
        stop = threading.Event()
        threading.Thread(target=lambda: [stack.watch_once() for _ in iter(lambda: stop.wait(0.1), True)], daemon=True).start()
        try:
            client = ApiClient(settings.api_url)
            client.wait_healthy(120)
            db = BlockingDatabase(settings.db_url)
            t_submit = time.time()
            run_id = client.create_run(spec.model_dump(mode="json"))["id"]
            first = wait(lambda: first_progress_after(db, run_id, 0, 0))
            cold_stack = first.ts - t_start
            cold_submit = first.ts - t_submit
            rows = []
            for k in range(args.kills):
                # Kill part-way into a chunk: 70% of the way to the next checkpoint.
                target = (k + 1) * args.chunk + int(args.chunk * 0.7)
                wait(lambda: (db.get_run(run_id).step or 0) >= target)
                old_pid = json.loads((settings.home / "pids.json").read_text())["services"]["worker_gpu"]["pid"]
                killed_at_step = db.get_run(run_id).step
                t_kill = time.time()
                os.kill(old_pid, signal.SIGKILL)
                # The supervisor thread restarts the worker and rewrites pids.json.
                t_restart = wait(
                    lambda: time.time()
                    if json.loads((settings.home / "pids.json").read_text())["services"]["worker_gpu"]["pid"] != old_pid
                    else None
                )
                resumed = wait(
                    lambda: next(
                        (e for e in db.events(run_id) if e.kind == "info" and e.ts > t_kill and "resumed from checkpoint" in e.message),
                        None,
                    )
                )
                from_step = int(resumed.message.rsplit(" ", 1)[1])
                step_event = wait(lambda: first_progress_after(db, run_id, t_kill, from_step))
                rows.append(
                    {
                        "killed_at_step": killed_at_step,
                        "resumed_from_step": from_step,
                        "steps_redone": killed_at_step - from_step,
                        "restart_to_first_step_s": round(step_event.ts - t_restart, 2),
                        "kill_to_first_step_s": round(step_event.ts - t_kill, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            final = wait(lambda: (r := client.get_run(run_id))["state"] in ("succeeded", "failed") and r, timeout=600)
        finally:
            stop.set()
            stack.stop()
    print(
        json.dumps(
            {
                "run_state": final["state"],
                "chunk_steps": args.chunk,
                "heartbeat_timeout_s": args.heartbeat_timeout,
                "steps_redone_per_kill": [r["steps_redone"] for r in rows],
                "median_restart_to_first_resumed_step_s": statistics.median(r["restart_to_first_step_s"] for r in rows),
                "median_kill_to_first_resumed_step_s": statistics.median(r["kill_to_first_step_s"] for r in rows),
                "cold_stack_start_to_first_step_s": round(cold_stack, 2),
                "cold_submit_to_first_step_s": round(cold_submit, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
