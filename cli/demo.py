"""`lockn-tune demo`: a tiny local model and dataset, the demo's spec, one run on the embedded
stack, and a check that the published adapter loads the way a user would load it."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from cli.api_client import ApiClient, ApiError
from cli.render import console, fail, follow, print_samples, print_summary
from cli.spec_file import submit
from schemas.run_spec import RunSpec
from schemas.settings import Settings
from store.layout import adapter_prefix


def demo_spec(model_dir: Path, dataset: Path) -> RunSpec:
    """Hyperparameters for the tiny demo model: a high LR, since its weights are random."""
    return RunSpec.model_validate(
        {
            "project": "demo",
            "name": "demo-lora",
            "base_model": str(model_dir),
            "dataset": str(dataset),
            "method": "lora",
            "eval_fraction": 0.1,
            "checkpoint_every_steps": 40,
            "hyperparameters": {
                "epochs": 4,
                "learning_rate": 3e-3,
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "max_seq_len": 128,
                "micro_batch_size": 8,
                "grad_accum": 1,
                "warmup_ratio": 0.05,
                "seed": 0,
            },
        }
    )


def prepare_demo(home: Path) -> tuple[Path, Path]:
    """The tiny model and dataset the demo tunes, made once under home/demo."""
    from activities.demo_data import demo_texts, write_demo_dataset
    from worker_gpu.tiny_model import make_tiny_model

    demo = home / "demo"
    model_dir, dataset = demo / "tiny-llama", demo / "instructions.jsonl"
    if not (model_dir / "config.json").exists():
        console.print(escape(f"building a tiny random-weight Llama model and tokenizer in {model_dir}"))
        make_tiny_model(model_dir, demo_texts())
    if not dataset.exists():
        write_demo_dataset(dataset)
    return model_dir, dataset


def verify_adapter(run: dict, spec: RunSpec) -> None:
    """Load the published adapter onto its base model the way a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec.base_model, local_files_only=True)
    adapter = run["adapter_path"]
    if adapter is None:  # the artifact store is remote (S3): fetch the published files
        import tempfile

        from store.open_store import open_store

        artifacts, prefix = open_store(Settings()), adapter_prefix(run["id"])
        adapter = tempfile.mkdtemp(prefix="lockn-adapter-")
        for key in artifacts.list(prefix):
            artifacts.get_file(key, Path(adapter) / key.removeprefix(prefix + "/"))
    model = PeftModel.from_pretrained(base, adapter)
    tensors = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    console.print(escape(f"  adapter loads with PeftModel.from_pretrained onto {spec.base_model} ({tensors} LoRA tensors)"))


def run_demo(settings: Settings, spec: RunSpec, keep_running: bool) -> int:
    """Start the embedded stack, tune `spec` to its end, print the results and check the adapter;
    then stop the stack (or, with keep_running, leave it up until Ctrl-C). The exit code: 0 when
    the run succeeded."""
    from cli.stack import Stack

    stack = Stack(settings)
    console.print("starting the embedded stack (Temporal dev server, API, worker_cpu, worker_gpu)")
    try:
        stack.start()
    except RuntimeError as exc:
        fail(str(exc))
    code = 1
    try:
        client = ApiClient(settings.api_url)
        client.wait_healthy(120)
        console.print(escape(f"API {settings.api_url} | Temporal UI {settings.temporal_ui_url} | logs {stack.logs}"))
        run = submit(client, spec)
        console.print(f"run [bold]{escape(run['id'])}[/bold] submitted")
        # Ctrl-C here stops the demo's own stack, and the run with it (see below).
        run = follow(client, run["id"])
        print_summary(run)
        if run["state"] == "succeeded":
            verify_adapter(run, spec)
        print_samples(run)
        code = 0 if run["state"] == "succeeded" else 1
        if keep_running:
            console.print("stack still running; Ctrl-C stops it")
            stack.run_forever(on_note=console.print)
    except ApiError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
    except KeyboardInterrupt:
        console.print("interrupted")
    finally:
        stack.stop()
    return code
