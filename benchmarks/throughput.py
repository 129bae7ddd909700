"""Training throughput: the project's LoRA recipe (padded and padding-free) against bare TRL
SFTTrainer (plain, padding_free=True, packing=True) on the same tokens, side by side.

Run: `.venv/bin/python benchmarks/throughput.py [--steps 20] [--warmup 2] [--rounds 1]`
(TRL is the `bench` extra: `pip install -e '.[bench]'`.)

The setup of issue 11, built here with no download: a random-weight Llama of ~32M parameters
(vocab 8,192), 1,500 prompt-completion rows of 22-446 tokens (median ~85, log-normal so long-tailed),
max_seq_len 512, 8 examples per optimizer step (micro-batch 8, no accumulation), LoRA r 16
(alpha 32, dropout 0.05) on all linear layers, float32, CPU. Both sides train on the rows the
project's snapshot tokenized (TRL gets input_ids and the completion mask, so the loss is on
the same answer tokens). TRL's packed mode packs rows of 512 tokens, so its batch is sized to
the same tokens per step as 8 examples (--packed-batch, default 2).

Each side runs in its own process (so peak RSS is its own), --warmup steps untimed and then
--steps timed steps; the order of sides alternates between rounds. Real tokens are the
non-padding tokens of the batches the timed steps trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("recipe_padded", "recipe_padding_free", "trl_plain", "trl_padding_free", "trl_packing")
ROWS, WORDS, SEED = 1500, 3000, 0
MAX_SEQ_LEN, PER_STEP = 512, 8
MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)


def build_model_and_data(work: Path) -> tuple[Path, Path]:
    """The 32M model (work/model) and the 1,500 rows (work/data.jsonl) of issue 11's setup."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker_gpu.tiny_model import train_tokenizer

    rng = random.Random(SEED)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(WORDS)]
    rows = []
    for _ in range(ROWS):
        # Tokens per row: log-normal around a median of 85, cut to 22-446; a third is the prompt.
        # A word is ~1.2 tokens of this tokenizer; the completion shape adds the end-of-text token.
        words = round((min(446, max(22, math.exp(rng.gauss(math.log(85), 0.7)))) - 1) / 1.2)
        prompt = words // 3
        say = lambda n: " ".join(rng.choice(lexicon) for _ in range(n))  # noqa: E731
        rows.append({"prompt": say(prompt), "completion": " " + say(words - prompt)})
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in rows] + [" ".join(lexicon)], 8192)
    config = LlamaConfig(
        vocab_size=8192, max_position_embeddings=MAX_SEQ_LEN, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False, **MODEL,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    return work / "model", data


def build_setup(work: Path) -> None:
    """The model, the data, the two plans and the snapshot's train rows, under work."""
    from activities.preflight import preflight_report
    from activities.snapshot import snapshot_dataset
    from schemas.hardware import HardwareInfo
    from schemas.run_spec import RunSpec
    from store.artifacts import LocalArtifactStore

    _, data = build_model_and_data(work)
    hardware = HardwareInfo(device="cpu", cpu_count=os.cpu_count() or 2, memory_available_bytes=8 * 2**30, disk_free_bytes=2**40)
    for batching in ("padded", "padding_free"):
        spec = RunSpec.model_validate({
            "base_model": str(work / "model"), "dataset": str(data), "eval_at_checkpoints": False,
            "hyperparameters": {
                "max_steps": 1000, "max_seq_len": MAX_SEQ_LEN, "micro_batch_size": PER_STEP, "grad_accum": 1,
                "lora_r": 16, "lora_alpha": 32, "gradient_checkpointing": False, "batching": batching, "seed": SEED,
            },
        })
        report = preflight_report("bench", spec, db=None, store=None, hardware=hardware, roots=(work,))
        if not report.ok:
            raise SystemExit("preflight refused the benchmark's spec: " + " ".join(report.errors))
        (work / f"plan_{batching}.json").write_text(report.plan.model_dump_json())
    snap = snapshot_dataset(report.plan, None, LocalArtifactStore(work / "store"), roots=(work,))
    (work / "train.jsonl").write_bytes(LocalArtifactStore(work / "store").local_file(snap.train_uri).read_bytes())


def train_rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]


def run_recipe(work: Path, batching: str, warmup: int, steps: int) -> dict:
    import torch

    from schemas.activities import TrainingPlan
    from worker_gpu.recipe_lora import LoraRecipe

    plan = TrainingPlan.model_validate_json((work / f"plan_{batching}.json").read_text())
    recipe = LoraRecipe(plan, train_rows(work), torch.device("cpu"))
    recipe.setup(None)
    for _ in range(warmup):
        recipe.train_step()
    tokens, losses, started = 0, [], time.perf_counter()
    for _ in range(steps):
        losses.append(recipe.train_step())
        tokens += recipe.last_step_tokens
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "loss": statistics.mean(losses)}


def run_trl(work: Path, mode: str, warmup: int, steps: int, packed_batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from activities.dataset_render import IGNORE

    rows = train_rows(work)
    dataset = Dataset.from_list(
        [{"input_ids": r["input_ids"], "completion_mask": [int(t != IGNORE) for t in r["labels"]]} for r in rows]
    )
    plan = json.loads((work / "plan_padded.json").read_text())["hyperparameters"]
    args = SFTConfig(
        output_dir=str(work / f"trl_{mode}"), max_steps=warmup + steps, learning_rate=plan["learning_rate"],
        per_device_train_batch_size=packed_batch if mode == "packing" else PER_STEP, gradient_accumulation_steps=1,
        # Rows are already cut to max_seq_len by the snapshot; TRL refuses max_length with padding_free alone.
        max_length=None if mode == "padding_free" else MAX_SEQ_LEN,
        padding_free=mode == "padding_free", packing=mode == "packing",
        gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, seed=SEED, save_strategy="no",
        report_to=[], logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(work / "model"),
        peft_config=peft,
    )
    batch_tokens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        batch_tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    trainer.train()
    return {"tokens": sum(batch_tokens[warmup : warmup + steps]), "seconds": ends[-1] - ends[warmup - 1], "loss": None}


def run_side(side: str, work: Path, warmup: int, steps: int, packed_batch: int) -> dict:
    if side.startswith("recipe_"):
        out = run_recipe(work, side.removeprefix("recipe_"), warmup, steps)
    else:
        out = run_trl(work, side.removeprefix("trl_"), warmup, steps, packed_batch)
    return {**out, "side": side, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps per side.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before them (at least 1).")
    parser.add_argument("--rounds", type=int, default=1, help="Passes over the sides, alternating their order.")
    parser.add_argument("--packed-batch", type=int, default=2, help="TRL packing: rows of 512 tokens per step.")
    parser.add_argument("--sides", default=",".join(SIDES), help="Comma-separated subset of " + ", ".join(SIDES))
    parser.add_argument("--workdir", help="Keep the model and data here and reuse them (default: a temp dir).")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child process: run one side in --workdir
    a = parser.parse_args()
    if a.side:
        print(json.dumps(run_side(a.side, Path(a.workdir), max(1, a.warmup), a.steps, a.packed_batch)))
        return

    sides = a.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="lockn-throughput-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "train.jsonl").exists():
            build_setup(work)
        lengths = [len(r["input_ids"]) for r in train_rows(work)]
        print(
            f"{len(lengths)} train rows, tokens {min(lengths)}-{max(lengths)}, median {statistics.median(lengths):.0f}, "
            f"mean {statistics.mean(lengths):.0f}; {a.warmup} warm-up + {a.steps} timed steps per side"
        )
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for round_ in range(a.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                cmd = [sys.executable, __file__, "--side", side, "--workdir", str(work), "--steps", str(a.steps),
                       "--warmup", str(a.warmup), "--packed-batch", str(a.packed_batch)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{side} failed:\n{done.stderr[-4000:]}")
                out = json.loads(done.stdout.strip().splitlines()[-1])
                results[side].append(out)
                print(f"  round {round_ + 1} {side}: {out['tokens'] / out['seconds']:.0f} tokens/s", flush=True)

    plain = statistics.median(r["tokens"] / r["seconds"] for r in results.get("trl_plain", [])) if "trl_plain" in results else None
    print(f"\n{'side':<22}{'real tokens/s':>14}{'x TRL plain':>12}{'peak RSS':>11}{'s/step':>8}")
    for side, runs in results.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        rss = max(r["peak_rss"] for r in runs) / 2**20
        per_step = statistics.median(r["seconds"] / a.steps for r in runs)
        ratio = f"{rate / plain:.2f}" if plain else "-"
        print(f"{side:<22}{rate:>14.0f}{ratio:>12}{rss:>8.0f} MiB{per_step:>8.2f}")


if __name__ == "__main__":
    main()
