"""Orchestration overhead: one run through the embedded stack vs the same training as a bare script.

Run: `make bench` or `.venv/bin/python benchmarks/orchestration_overhead.py [--steps 180] [--repeat 2]
[--checkpoint-every 50]`

Both sides tune the same tiny model on the same data with the same plan and seed. The bare
side loads the model, trains every step in one loop, evaluates base and tuned, and saves
the adapter: no Temporal, no DB, no checkpoints. The stack side is `lockn-tune up` (already
started, not timed) and one run submitted through the HTTP API, timed from submit to
succeeded. The stack trains in chunks of --checkpoint-every steps (the demo's 40: five chunks of
its 180 steps), each committing a checkpoint and, as the demo spec asks, measuring eval loss
there; the report splits out what those checkpoint evals cost. It also compares the two adapters' sha256: chunked training with checkpoints in
between should give the same bits as one uninterrupted loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.demo_setup import demo_inputs, loopback_settings  # noqa: E402
from cli.api_client import ApiClient  # noqa: E402
from schemas.run_spec import RunSpec  # noqa: E402


def bare_run(spec: RunSpec, out: Path) -> tuple[float, dict]:
    """The same training with the library pieces called directly, in one process."""
    import torch

    from activities.base_model import load_tokenizer
    from activities.preflight import preflight_report
    from activities.snapshot import snapshot_dataset
    from store.artifacts import LocalArtifactStore
    from worker_gpu.model_loading import attach_adapter, load_base_model, pick_device, plan_dtype
    from worker_gpu.activities import SAMPLES
    from worker_gpu.recipe_lora import LoraRecipe, eval_loss
    from worker_gpu.samples import generate_sample

    started = time.perf_counter()
    # The plan exactly as the preflight activity makes it (activities/cpu.py).
    roots = (Path(spec.dataset).resolve().parent,)
    report = preflight_report("bare", spec, db=None, store=None, roots=roots)
    if not report.ok:
        raise SystemExit("preflight refused the benchmark's spec: " + " ".join(report.errors))
    plan = report.plan
    # The rows the stack trains and evaluates on: the same snapshot, into a local store.
    store = LocalArtifactStore(out.parent / f"{out.name}-store")
    snap = snapshot_dataset(plan, None, store, roots=roots)
    rows = lambda key: [json.loads(line) for line in store.local_file(key).read_text().splitlines()]  # noqa: E731
    train, evals = rows(snap.train_uri), rows(snap.eval_uri)
    tok = load_tokenizer(plan.base_model_path)
    device = pick_device()
    dtype = plan_dtype(plan, device)
    measure = lambda model: eval_loss(  # noqa: E731
        model, evals, plan.micro_batch_size, device, dtype, batching=plan.batching, max_seq_len=plan.max_seq_len
    )[0]

    def samples(model) -> None:
        # The stack's evaluate generates these beside each eval loss (baseline and tuned).
        for row in evals[:SAMPLES]:
            generate_sample(model, tok, row["prompt"], device, plan.max_seq_len, spec.max_new_tokens)

    base = load_base_model(plan, device)
    baseline = measure(base)
    samples(base)
    del base
    recipe = LoraRecipe(plan, train, device)
    recipe.setup(None)
    recipe.train(plan.total_steps, lambda step, loss: False)
    recipe.model.save_pretrained(out)
    recipe.cleanup()
    tuned_model = attach_adapter(load_base_model(plan, device), plan, out, trainable=False)
    eval_started = time.perf_counter()
    tuned = measure(tuned_model)
    eval_seconds = time.perf_counter() - eval_started
    samples(tuned_model)
    elapsed = time.perf_counter() - started
    del torch
    return elapsed, {
        "baseline": baseline, "tuned": tuned, "adapter_sha256": sha256(out / "adapter_model.safetensors"),
        "eval_rows": len(evals), "eval_s": eval_seconds,
    }


def setup_32m(tmp: Path) -> tuple[Path, Path, RunSpec]:
    """Issue 11's setup: the 32M model and its 1,500 rows; the batch shape of the throughput
    benchmark (8 examples per step), the rest as a user's spec leaves it to the planner."""
    from benchmarks.throughput import MAX_SEQ_LEN, PER_STEP, build_model_and_data

    model, data = build_model_and_data(tmp)
    spec = RunSpec.model_validate({
        "name": "bench-32m", "base_model": str(model), "dataset": str(data),
        "hyperparameters": {"max_steps": 20, "max_seq_len": MAX_SEQ_LEN, "micro_batch_size": PER_STEP, "grad_accum": 1,
                            "lora_r": 16, "lora_alpha": 32, "gradient_checkpointing": False, "seed": 0},
    })
    return model, data, spec


def stack_run(client: ApiClient, spec: RunSpec) -> tuple[float, dict]:
    started = time.perf_counter()
    body = spec.model_dump(mode="json")
    run = client.create_run(body)
    while run["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        run = client.get_run(run["id"])
    elapsed = time.perf_counter() - started
    if run["state"] != "succeeded":
        raise SystemExit(f"stack run {run['id']} ended {run['state']}: {run['error']}")
    adapter = Path(run["adapter_path"]) / "adapter_model.safetensors"
    return elapsed, {
        "baseline": run["baseline_eval_loss"], "tuned": run["tuned_eval_loss"], "adapter_sha256": sha256(adapter),
        "phases": phases(client.run_events(run["id"]), started_at=run["created_at"]),
    }


def phases(events: list[dict], started_at: float) -> dict[str, float]:
    """Where the stack run's time went, from its events: each state until the next one, with
    training split into steps, checkpoints (save, checkpoint eval and commit: from a chunk's
    last step to its checkpoint's event) and chunk set-up (from a checkpoint to the next
    chunk's first reported step, which includes that step)."""
    out: dict[str, float] = {}
    state, since, after_checkpoint = "submitted", started_at, False
    for e in events:
        checkpoint = e["kind"] == "progress" and "checkpoint" in e["data"]
        if checkpoint:
            label = "checkpoint save+eval+commit"
        elif e["kind"] == "progress" and after_checkpoint:
            label = "next chunk set-up+first step"
        elif e["kind"] == "progress":
            label = "training steps"
        else:
            label = state
        out[label] = out.get(label, 0.0) + e["ts"] - since
        since = e["ts"]
        if e["kind"] == "state":
            state = e["state"]
        if e["kind"] in ("state", "progress"):
            after_checkpoint = checkpoint
    return {k: round(v, 2) for k, v in out.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default: the demo's 4 epochs = 180 steps)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the median is reported")
    parser.add_argument(
        "--setup", choices=("demo", "32m"), default="demo",
        help="demo: the demo's tiny model and spec; 32m: issue 11's 32M-parameter Llama and 1,500 rows "
        "(benchmarks/throughput.py), 8 examples per step, max_seq_len 512",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=None,
        help="steps per chunk on the stack side (default: the demo's 40; RunSpec's default is 50)",
    )
    args = parser.parse_args()

    from cli.stack import Stack

    with tempfile.TemporaryDirectory(prefix="lockn-bench-") as tmp:
        tmp = Path(tmp)
        _, data, spec = demo_inputs(tmp) if args.setup == "demo" else setup_32m(tmp)
        if args.steps:
            spec.hyperparameters.max_steps = args.steps
        if args.checkpoint_every:
            spec.checkpoint_every_steps = args.checkpoint_every
        settings = loopback_settings(tmp / "home", 18400)
        stack = Stack(settings)
        t0 = time.perf_counter()
        stack.start()
        client = ApiClient(settings.api_url)
        client.wait_healthy(120)
        startup = time.perf_counter() - t0
        ds = client.upload_dataset(data, spec.project)
        stack_spec = spec.model_copy(update={"dataset": ds["id"]})
        try:
            # Warm-up (not timed) on both sides: imports and first model loads are paid once
            # per process, and a long-lived worker pays them once for all its runs.
            stack_run(client, stack_spec)
            bare_run(spec, tmp / "bare-warmup")
            stack_times, bare_times = [], []
            for i in range(args.repeat):
                s, s_res = stack_run(client, stack_spec)
                b, b_res = bare_run(spec, tmp / f"bare-{i}")
                stack_times.append(s)
                bare_times.append(b)
                print(f"round {i + 1}: stack {s:.2f}s  bare {b:.2f}s", flush=True)
        finally:
            stack.stop()
    stack_med, bare_med = statistics.median(stack_times), statistics.median(bare_times)
    report = {
        "steps": spec.hyperparameters.max_steps or "4 epochs",
        "checkpoint_every_steps": spec.checkpoint_every_steps,
        # One eval-loss pass over the eval split (the stack runs one at every checkpoint).
        "eval_rows": b_res["eval_rows"],
        "eval_pass_s": round(b_res["eval_s"], 2),
        "stack_startup_s": round(startup, 2),
        "stack_run_s": round(stack_med, 2),
        "bare_run_s": round(bare_med, 2),
        "ratio": round(stack_med / bare_med, 3),
        "overhead_s": round(stack_med - bare_med, 2),
        "stack_losses": [round(s_res["baseline"], 4), round(s_res["tuned"], 4)],
        "bare_losses": [round(b_res["baseline"], 4), round(b_res["tuned"], 4)],
        "same_adapter_bits": s_res["adapter_sha256"] == b_res["adapter_sha256"],
        "stack_phases_s": s_res["phases"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
