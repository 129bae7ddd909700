"""Training on a GPU: tokens/s, peak CUDA memory against the planner's estimate, and MFU.

Run on a machine with an NVIDIA GPU (nothing is downloaded):
`.venv/bin/python benchmarks/gpu_training.py [--size 0.5b] [--methods lora,qlora] [--steps 20]`
On a machine without one it runs the same path on the CPU at --size tiny, as a check that
the script works (MFU and CUDA memory are then not reported).

Builds a random-weight Qwen2-architecture model locally at the shape of a real one (--size:
0.5b is Qwen2.5-0.5B's 24 layers of 896, 1.5b is Qwen2.5-1.5B's 28 of 1536; tiny is two
layers of 128) and issue 11's 1,500 long-tailed instruction rows (benchmarks/throughput.py),
and plans each method with the project's own preflight for this machine's hardware, so the
precision (bf16 where supported), batching (padding-free), attention (flash-attention 2
when the flash-attn package is installed, else SDPA) and micro-batch are what a run here
would get. Then `LoraRecipe` trains --warmup untimed and --steps timed steps.

Reported per method: real (non-padding) tokens/s; peak CUDA memory allocated over the timed
steps (torch.cuda.max_memory_allocated) against the plan's estimate and the error; MFU, the
model FLOPs the step needed over the time it took and the GPU's peak dense 16-bit FLOPs
(--peak-tflops, or a table of known GPUs). Model FLOPs per real token: 2N forward + 2N
backward through the frozen weights (activation gradients; LoRA needs no weight gradients
for them) + 6 x the LoRA parameters, plus attention, 2 x 2 x layers x hidden x the mean
context a token attends to (half its example's length) forward, twice that backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
VOCAB = 151_936  # Qwen2.5's vocabulary: the output head is a large share of a small model's FLOPs
# Peak dense bf16 tensor-core FLOPs (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def build_model(work: Path, size: str) -> tuple[Path, Path]:
    """The random-weight model at `size` with the throughput benchmark's tokenizer and rows."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from benchmarks.throughput import MAX_SEQ_LEN, build_model_and_data

    small, data = build_model_and_data(work)  # the 32M Llama, its tokenizer and the data
    tokenizer = AutoTokenizer.from_pretrained(small)
    config = Qwen2Config(
        vocab_size=VOCAB if size != "tiny" else 8192, max_position_embeddings=MAX_SEQ_LEN * 8,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=size == "0.5b", **SIZES[size],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    out = work / f"qwen2-{size}"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out, data


def plan_for(work: Path, model: Path, data: Path, method: str):
    """The plan preflight makes on this machine, and the snapshot's train rows."""
    from activities.preflight import preflight_report
    from activities.snapshot import snapshot_dataset
    from runtime.hardware import worker_hardware
    from schemas.run_spec import RunSpec
    from store.artifacts import LocalArtifactStore

    from benchmarks.throughput import MAX_SEQ_LEN, PER_STEP

    spec = RunSpec.model_validate({
        "base_model": str(model), "dataset": str(data), "method": method, "eval_at_checkpoints": False,
        "hyperparameters": {"max_steps": 10_000, "max_seq_len": MAX_SEQ_LEN, "grad_accum": 1, "micro_batch_size": PER_STEP,
                            "lora_r": 16, "lora_alpha": 32, "seed": 0},
    })
    report = preflight_report("gpu-bench", spec, db=None, store=None, hardware=worker_hardware(work), roots=(work,))
    if not report.ok:
        raise SystemExit(f"preflight refused {method}: " + " ".join(report.errors))
    store = LocalArtifactStore(work / "store")
    snap = snapshot_dataset(report.plan, None, store, roots=(work,))
    rows = [json.loads(line) for line in store.local_file(snap.train_uri).read_text().splitlines()]
    return report.plan, rows


def step_flops(model, lengths: list[int]) -> float:
    """Model FLOPs of one training step over examples of these lengths (see the module docstring)."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    flops = 0.0
    for n in lengths:
        attention = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * (n / 2)
        flops += n * (4 * frozen + 6 * lora + 3 * attention)
    return flops


def measure(plan, rows: list[dict], warmup: int, steps: int) -> dict:
    import torch

    from worker_gpu.model_loading import attention_implementation, pick_device, plan_dtype
    from worker_gpu.recipe_lora import LoraRecipe

    device = pick_device()
    recipe = LoraRecipe(plan, rows, device)
    recipe.setup(None)
    for _ in range(warmup):
        recipe.train_step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens, flops, seconds = 0, 0.0, 0.0
    for _ in range(steps):
        started = time.perf_counter()
        recipe.train_step()
        if cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        tokens += recipe.last_step_tokens
        flops += step_flops(recipe.model, recipe.last_step_lengths)
    out = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": plan.precision, "batching": plan.batching, "micro_batch": plan.micro_batch_size,
        "attention": attention_implementation(device, plan_dtype(plan, device)) or "sdpa (default)",
        "tokens_per_s": tokens / seconds, "achieved_tflops": flops / seconds / 1e12,
        "estimate_bytes": plan.memory_estimate_bytes,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    recipe.cleanup()
    return out


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: 0.5b on a GPU, tiny on CPU")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense 16-bit TFLOPs")
    parser.add_argument("--json", help="also write the results here")
    a = parser.parse_args()

    import torch

    size = a.size or ("0.5b" if torch.cuda.is_available() else "tiny")
    results = []
    with tempfile.TemporaryDirectory(prefix="lockn-gpu-bench-") as tmp:
        work = Path(tmp)
        model, data = build_model(work, size)
        for method in a.methods.split(","):
            if method == "qlora" and not torch.cuda.is_available():
                print("qlora: skipped, bitsandbytes 4-bit needs a GPU")
                continue
            plan, rows = plan_for(work, model, data, method)
            r = {"method": method, "size": size, **measure(plan, rows, a.warmup, a.steps)}
            peak = peak_tflops(r["device"], a.peak_tflops)
            r["mfu"] = r["achieved_tflops"] / peak if peak and r["device"] != "cpu" else None
            results.append(r)

    print(f"\n{'method':<7}{'size':<6}{'device':<28}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak GiB':>10}{'est. GiB':>10}{'error':>8}  batching/attention")
    for r in results:
        gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
        err = f"{(r['estimate_bytes'] - r['peak_bytes']) / r['peak_bytes']:+.0%}" if r["peak_bytes"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['method']:<7}{r['size']:<6}{r['device'][:27]:<28}{r['tokens_per_s']:>10.0f}{r['achieved_tflops']:>9.2f}"
              f"{mfu:>7}{gib(r['peak_bytes']):>10}{gib(r['estimate_bytes']):>10}{err:>8}  "
              f"{r['batching']} mb{r['micro_batch']} {r['precision']} {r['attention']}")
    print(f"median tokens/s: {statistics.median(r['tokens_per_s'] for r in results):.0f}" if results else "no results")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
