"""Memory estimate vs measured peak: LoRA and QLoRA training steps on tiny models, on CPU.

Run: `.venv/bin/python benchmarks/memory_estimate.py [--models llama,qwen2] [--methods lora,qlora] [--points 512x4,512x4ckpt,512x4pf]`

Builds two random-weight models in a temporary directory: a Llama (hidden 512, 4 layers,
8 heads / 4 kv heads, intermediate 1408, vocab 8192: 20M parameters) and a Qwen2 (hidden
384, 3 layers, 6 heads of 96 / 2 kv heads, intermediate 1024, vocab 6144, q/k/v biases,
tied embeddings: 7.7M parameters). For each model, method (LoRA r=16 on all-linear, and
QLoRA) and (seq_len, micro_batch) point it measures, in a fresh subprocess, the peak
memory of one real training step and one eval batch, and compares it with
`activities.memory_estimate.estimate_training_memory` for the model's config.json.

What runs: `LoraRecipe.setup` loads the model through `load_base_model` /
`attach_adapter`; a first `train_step` warms up (AdamW allocates its moments there); then
the second `train_step` (forward, backward, clip, AdamW step, exactly as training runs)
and `eval_loss` on one batch are measured. A micro-batch holds one row of seq_len tokens
and shorter ones, so it is padded as real batches are (a batch of one row never is).
Points marked "ckpt" train with gradient checkpointing; points marked "pf" train
padding-free (worker_gpu/packing.py) on rows packed full, micro_batch rows of seq_len tokens
each made of four examples, the most a padding-free micro-batch holds. Training on CPU is float32.
grad_accum is 1, so every step is that one padded micro-batch; LoRA gradients are then
not yet allocated at the peak, while the estimate keeps them (they are for grad_accum > 1):
a conservative 2.3 MB here.

Measuring method: peak resident memory (RSS) of the subprocess, minus its RSS right
before the model loads. Before that baseline the subprocess has imported torch,
transformers, peft and bitsandbytes and trained one step of a micro model of the same
architecture, so code paged in and thread pools started on first use are framework
overhead (the baseline, printed below the table), not model. After loading, weights
that are views of the memory-mapped safetensors file are copied into process memory, as
a GPU load would, so the file mapping (which QLoRA reads in full to quantize, and whose
pages the kernel may drop at will) is released. The peak is reset right before the
measured step (`echo 5 > /proc/self/clear_refs`) and read from VmHWM after the eval
batch. The subprocess runs with MALLOC_MMAP_THRESHOLD_=131072 (glibc gives every
allocation over 128 KiB its own mapping and returns it when freed) and
MKL_DISABLE_FAST_MM=1 (MKL frees its GEMM buffers instead of pooling them), so resident
memory follows live tensors, as torch.cuda.max_memory_allocated does on a GPU, rather
than allocator high-water marks.

Prints one row per point (estimate, measured, error) and exits 1 when any estimate is
off by more than 15%. Takes 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from activities.memory_estimate import ModelShape, estimate_training_memory  # noqa: E402

TOLERANCE = 0.15
LORA_R = 16
# name: (architecture, config, default points "seq_len x micro_batch [ckpt]")
MODELS = {
    "llama": (
        "llama",
        dict(
            vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        ),
        "128x1,256x2,512x4,1024x1,512x4ckpt,512x4pf,1024x2pf",
    ),
    "qwen2": (
        "qwen2",
        dict(
            vocab_size=6144, hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, head_dim=96, max_position_embeddings=2048, tie_word_embeddings=True,
        ),
        "256x4,768x2,768x2ckpt,768x2pf",
    ),
}
# Trained once in each subprocess before its baseline (see the docstring).
WARM_UP_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
# Make resident memory follow live memory (see the docstring).
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MKL_DISABLE_FAST_MM": "1"}
MB = 2**20


def build_model(out_dir: Path, arch: str, config: dict) -> Path:
    """A random-weight model written with save_pretrained (no tokenizer: inputs are random ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(**config, pad_token_id=0, eos_token_id=1, bos_token_id=None, torch_dtype="float32")
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def parse_points(text: str) -> list[tuple[int, int, bool, str]]:
    """"seq_len x micro_batch", then "ckpt" (gradient checkpointing) or "pf" (padding-free)."""
    points = []
    for item in text.split(","):
        ckpt, pf = item.endswith("ckpt"), item.endswith("pf")
        seq, mb = item.removesuffix("ckpt").removesuffix("pf").split("x")
        points.append((int(seq), int(mb), ckpt, "padding_free" if pf else "padded"))
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--points", help="seq_lenxmicro_batch[ckpt|pf], comma-separated (default: per model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return 0

    from activities.base_model import count_parameters

    errors, baselines = [], []
    print(f"{'model':6} {'method':6} {'seq_len':>7} {'micro_batch':>11} {'ckpt':>4} {'batching':>12} "
          f"{'estimate MB':>11} {'measured MB':>11} {'error':>7}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lockn-mem-") as tmp:
        for name in args.models.split(","):
            arch, config, default_points = MODELS[name]
            model_dir = build_model(Path(tmp) / name, arch, config)
            warm_up_dir = build_model(Path(tmp) / f"{name}-warm-up", arch, WARM_UP_CONFIG)
            num_params, _ = count_parameters(model_dir)
            shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()), num_params)
            for method in args.methods.split(","):
                for seq, mb, ckpt, batching in parse_points(args.points or default_points):
                    point = dict(
                        model_dir=str(model_dir), warm_up_dir=str(warm_up_dir), vocab_size=config["vocab_size"],
                        method=method, seq_len=seq, micro_batch=mb, checkpointing=ckpt, batching=batching,
                    )
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(point)],
                        env={**os.environ, **MEASURING_ENV}, capture_output=True, text=True, cwd=ROOT, check=False,
                    )
                    if out.returncode != 0:
                        print(out.stderr[-3000:], file=sys.stderr)
                        return 2
                    measured = json.loads(out.stdout.strip().splitlines()[-1])
                    estimate = estimate_training_memory(
                        shape, method=method, lora_r=LORA_R, target_modules="all-linear", seq_len=seq,
                        micro_batch=mb, gradient_checkpointing=ckpt, dtype="float32", device="cpu", batching=batching,
                    ).training_bytes
                    error = estimate / measured["peak_bytes"] - 1
                    errors.append(error)
                    baselines.append(measured["baseline_bytes"])
                    print(
                        f"{name:6} {method:6} {seq:>7} {mb:>11} {'yes' if ckpt else 'no':>4} {batching:>12} {estimate / MB:>11.1f} "
                        f"{measured['peak_bytes'] / MB:>11.1f} {error:>+7.1%}",
                        flush=True,
                    )
    worst = max(abs(e) for e in errors)
    print(
        "estimate: estimate_training_memory(...).training_bytes (its total minus the framework overhead); "
        "measured: peak RSS of the step and eval batch minus RSS before the model loads.\n"
        f"framework overhead (that baseline): {min(baselines) / MB:.0f}-{max(baselines) / MB:.0f} MB. "
        f"worst error {worst:.1%} (tolerance {TOLERANCE:.0%})."
    )
    return 1 if worst > TOLERANCE else 0


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _recipe(
    model_dir: str, method: str, seq_len: int, micro_batch: int, checkpointing: bool, vocab_size: int,
    batching: str = "padded",
):
    """A LoraRecipe on one micro-batch of random ids per step: padded, one full-length row and the
    others shorter; padding-free, micro_batch full rows of seq_len tokens, four examples each."""
    import torch

    from schemas.activities import TrainingPlan
    from schemas.run_spec import Method, RunSpec
    from worker_gpu.recipe_lora import LoraRecipe

    try:
        from schemas.run_spec import ResolvedHyperparameters as HP
    except ImportError:
        from schemas.run_spec import Hyperparameters as HP

    hp = HP(
        epochs=1, learning_rate=1e-4, warmup_ratio=0.0, lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.05,
        target_modules="all-linear", max_seq_len=seq_len, micro_batch_size=micro_batch, grad_accum=1,
        gradient_checkpointing=checkpointing, batching=batching,
    )
    spec = RunSpec(base_model=model_dir, dataset="unused.jsonl", method=Method(method), hyperparameters=hp)
    plan = TrainingPlan.model_construct(
        run_id="bench", spec=spec, hyperparameters=hp, base_model_path=model_dir,
        micro_batch_size=micro_batch, grad_accum=1, max_seq_len=seq_len, total_steps=10, warmup_steps=0,
    )
    g = torch.Generator().manual_seed(0)
    if batching == "padding_free":
        lengths = [seq_len // 4] * (4 * micro_batch)
        plan.hyperparameters.micro_batch_size = len(lengths)  # the examples of one step; packed into micro_batch rows
    else:
        lengths = [seq_len - i * max(1, seq_len // (2 * micro_batch)) for i in range(micro_batch)]
    rows = []
    for n in lengths:
        ids = torch.randint(2, vocab_size, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    # grad_accum 1: each step is exactly this one micro-batch, so every step is padded alike.
    return LoraRecipe(plan, rows, torch.device("cpu")), rows


def measure(
    model_dir: str, warm_up_dir: str, vocab_size: int, method: str, seq_len: int, micro_batch: int, checkpointing: bool,
    batching: str = "padded",
) -> dict:
    """In a fresh process: peak RSS of one steady-state training step and one eval batch."""
    import gc

    import torch

    from worker_gpu.recipe_lora import eval_loss

    # Warm up the framework on a micro model (same code path), then forget it.
    recipe, rows = _recipe(warm_up_dir, method, 32, 2, checkpointing, WARM_UP_CONFIG["vocab_size"])
    recipe.setup(None)
    recipe.train_step()
    eval_loss(recipe.model, rows, 2, recipe.device, recipe.dtype)
    recipe.cleanup()
    del recipe, rows
    gc.collect()

    recipe, rows = _recipe(model_dir, method, seq_len, micro_batch, checkpointing, vocab_size, batching)
    baseline = _status_bytes("VmRSS")
    recipe.setup(None)
    with torch.no_grad():
        # Weights load as views of the memory-mapped safetensors file: copy them into
        # process memory, as a GPU load would, so that the mapping (whose pages the kernel
        # may drop at will, and which QLoRA reads in full to quantize) is released.
        for t in [*recipe.model.parameters(), *recipe.model.buffers()]:
            if type(t) in (torch.nn.Parameter, torch.Tensor) and t.is_floating_point():
                t.data = t.data.clone()
    recipe.train_step()  # warm-up: AdamW allocates its moments here
    Path("/proc/self/clear_refs").write_text("5")  # peak := current
    recipe.train_step()
    eval_loss(recipe.model, rows, micro_batch, recipe.device, recipe.dtype, batching=batching, max_seq_len=seq_len)
    peak = _status_bytes("VmHWM")
    return {"baseline_bytes": baseline, "peak_bytes": peak - baseline}


if __name__ == "__main__":
    sys.exit(main())
