"""`lockn-tune`: the command line of LockN Tune.

    lockn-tune demo                 # the whole thing on a tiny local model, end to end
    lockn-tune up                   # the embedded stack: Temporal, API, workers
    lockn-tune preflight SPEC.yaml  # dry run: plan, memory, data checks, defaults
    lockn-tune tune SPEC.yaml       # submit a run and follow it
    lockn-tune runs list|show|pause|resume|cancel
    lockn-tune models make-tiny DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.api_client import ApiClient, ApiError
from schemas.run_spec import RunSpec
from schemas.settings import Settings

app = typer.Typer(help="LockN Tune: durable LoRA/QLoRA fine-tuning on Temporal.", no_args_is_help=True)
runs_app = typer.Typer(help="List, inspect and cancel runs.", no_args_is_help=True)
models_app = typer.Typer(help="Local models.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
db_app = typer.Typer(help="The metadata database (SQLite or PostgreSQL): migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
# Piped output (scripts, logs) gets full lines rather than 80-column wrapping.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

TERMINAL = {"succeeded", "failed", "cancelled"}
SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML or JSON).", exists=True, dir_okay=False)]
ApiOpt = Annotated[Optional[str], typer.Option("--api", help="API address; default from LOCKN_TUNE_API_HOST/PORT.")]


def _settings(home: Path | None = None, **overrides) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home.expanduser().resolve()
    return Settings(**values)


def _client(api: str | None) -> ApiClient:
    settings = Settings()
    return ApiClient(api or settings.api_url, token=settings.api_token.get_secret_value() or None)


def _fail(message: str, code: int = 1):
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _api(call, *args):
    """Call the API; an error becomes a one-line message and exit code 1."""
    try:
        return call(*args)
    except ApiError as exc:
        _fail(str(exc))


def load_spec(path: Path) -> RunSpec:
    """Read a YAML/JSON spec; a wrong field is reported with its name."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read spec {path}: {exc}")
    if not isinstance(raw, dict):
        _fail(f"spec {path} must be a mapping of fields (base_model, dataset, ...)")
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        _fail(f"spec {path} is not valid:\n" + "\n".join(lines))


def submit(client: ApiClient, spec: RunSpec) -> dict:
    """Upload a local dataset file first, so the run works from an immutable copy."""
    return client.create_run(_with_uploaded_dataset(client, spec))


def _with_uploaded_dataset(client: ApiClient, spec: RunSpec) -> dict:
    body = spec.model_dump(mode="json")
    # Workers do not share our working directory: send local model paths absolute.
    model_dir = Path(spec.base_model).expanduser()
    if model_dir.is_dir():
        body["base_model"] = str(model_dir.resolve())
    path = Path(spec.dataset).expanduser()
    if not spec.dataset.startswith("ds_") and path.is_file():
        ds = client.upload_dataset(path, spec.project)
        console.print(
            f"dataset [bold]{ds['name']}[/bold] uploaded as {ds['id']} "
            f"({ds['valid_rows']} valid {ds['shape']} rows, sha256 {ds['sha256'][:12]})"
        )
        if ds["bad_rows"]:
            console.print(f"[yellow]warning:[/yellow] {ds['report']['message']}")
        body["dataset"] = ds["id"]
    return body


def follow(client: ApiClient, run_id: str) -> dict:
    """A live progress bar (state, step of total, loss) until the run ends."""
    with Progress(
        TextColumn("[bold]{task.fields[state]:<15}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(run_id, total=None, state="queued", loss="-")
        while True:
            run = client.get_run(run_id)
            loss = f"{run['loss']:.4f}" if run.get("loss") is not None else "-"
            bar.update(task, total=run.get("total_steps"), completed=run["step"], state=run["state"], loss=loss)
            if run["state"] in TERMINAL:
                return run
            time.sleep(0.5)


def print_summary(run: dict, settings: Settings | None = None) -> None:
    state = run["state"]
    colour = {"succeeded": "green", "failed": "red"}.get(state, "yellow")
    console.print(f"run [bold]{run['id']}[/bold] [{colour}]{state}[/{colour}]")
    if run.get("error"):
        console.print(f"  reason: {run['error']}")
    if run.get("baseline_eval_loss") is not None:
        console.print(f"  baseline eval loss: {run['baseline_eval_loss']:.4f}")
    if run.get("tuned_eval_loss") is not None:
        delta = run["tuned_eval_loss"] - run["baseline_eval_loss"]
        console.print(f"  tuned eval loss:    {run['tuned_eval_loss']:.4f}  ({delta:+.4f})")
    if run.get("adapter_path") or run.get("adapter_uri"):
        console.print(f"  adapter:  {run.get('adapter_path') or run.get('adapter_uri')}")
    if run.get("manifest_uri"):
        console.print(f"  manifest: {run['manifest_uri']}")
    for artifact in run.get("artifacts", []):
        m = artifact["manifest"]
        console.print(
            f"  lineage:  dataset sha256 {m['dataset']['sha256'][:12]}, spec sha256 {m['spec_sha256'][:12]}, "
            f"base {m['base_model']['id']} @ {m['base_model']['revision'][:12]}, seed {m['seed']}, "
            f"torch {m['packages']['torch']}, peft {m['packages']['peft']}, {m['code_version']}"
        )
    console.print(f"  Temporal UI: {run['temporal_ui_url']}")


@app.command()
def up(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
    api_port: Annotated[Optional[int], typer.Option(help="API port.")] = None,
    temporal_port: Annotated[Optional[int], typer.Option(help="Temporal frontend port.")] = None,
    ui_port: Annotated[Optional[int], typer.Option(help="Temporal UI port.")] = None,
):
    """Start the embedded stack and keep it running until Ctrl-C. Unfinished runs continue."""
    from cli.stack import Stack
    from runtime.logs import configure_logging

    configure_logging("supervisor")
    settings = _settings(
        home,
        api_port=api_port,
        temporal_address=f"127.0.0.1:{temporal_port}" if temporal_port else None,
        temporal_ui_port=ui_port,
    )
    stack = Stack(settings)
    try:
        stack.start()
    except RuntimeError as exc:
        _fail(str(exc))
    console.print(f"LockN Tune is up (home {settings.home})")
    console.print(f"  API:         {settings.api_url}  (docs {settings.api_url}/docs)")
    console.print(f"  Temporal UI: {settings.temporal_ui_url}")
    console.print(f"  logs:        {stack.logs}")
    if settings.auth_enabled:
        console.print(f"  auth:        OIDC tokens from {settings.oidc_issuer} (audience {settings.oidc_audience})")
    else:
        console.print("  auth:        off (embedded stack: one local user with admin on every project)")
    console.print(f"  metadata:    {_redact(settings.db_url)}")
    store = f"s3://{settings.s3_bucket} at {settings.s3_endpoint}" if settings.artifact_store == "s3" else settings.artifacts_root
    console.print(f"  artifacts:   {store}")
    console.print("Ctrl-C stops it; starting it again picks up unfinished runs.")
    stack.run_forever(on_note=console.print)


@app.command()
def tune(
    spec_file: SpecArg,
    api: ApiOpt = None,
    no_follow: Annotated[bool, typer.Option("--no-follow", help="Submit and return.")] = False,
):
    """Submit a tuning run and follow it to the end with a progress bar."""
    spec = load_spec(spec_file)
    client = _client(api)
    try:
        run = submit(client, spec)
        console.print(f"run [bold]{run['id']}[/bold] submitted; Temporal UI: {run['temporal_ui_url']}")
        if no_follow:
            return
        run = follow(client, run["id"])
    except ApiError as exc:
        _fail(str(exc))
    print_summary(run)
    if run["state"] != "succeeded":
        raise typer.Exit(1)


def print_preflight(report: dict) -> None:
    """The preflight report for a person: verdict, hardware, memory, data, defaults."""
    hw = report.get("hardware") or {}
    device = f"GPU {hw.get('gpu_name')} ({hw.get('gpu_memory_bytes', 0) / 1e9:.0f} GB)" if hw.get("device") == "cuda" else (
        f"CPU only ({hw.get('cpu_count')} cores, {(hw.get('memory_available_bytes') or 0) / 1e9:.0f} GB free): "
        "training runs on the CPU, slowly"
    )
    console.print(f"hardware: {device}; bitsandbytes {'usable' if hw.get('bitsandbytes_usable') else 'not usable'}")
    ds = report.get("dataset")
    if ds:
        v, t = ds["validation"], ds["token_lengths"]
        console.print(
            f"dataset: {v['valid_rows']} valid {v['shape']} rows of {v['total_rows']} "
            f"({ds['train_rows']} train / {ds['eval_rows']} eval), {ds['duplicate_rows']} duplicates"
        )
        console.print(f"  tokens per row: min {t['min']}, median {t['p50']}, p95 {t['p95']}, max {t['max']}")
        for lo, hi, n in zip(t["histogram_edges"], t["histogram_edges"][1:], t["histogram_counts"]):
            console.print(f"  {lo:>6}-{hi:<6} {'#' * max(1 if n else 0, round(40 * n / max(1, ds['measured_rows'])))} {n}")
        for p in v["problems"][:5]:
            console.print(f"  [yellow]{p['reason']}[/yellow]")
        for sample in ds["samples"][:1]:
            console.print(f"  sample (line {sample['line']}), as the model sees it:\n{sample['text']}")
            console.print(f"  ...of which it learns: {sample['trained_text']!r}")
    mem = report.get("memory")
    if mem:
        console.print(f"memory: needs {mem['estimate_bytes'] / 1e9:.2f} GB of {mem['available_bytes'] / 1e9:.1f} GB usable on {mem['device']}")
        for line in mem["lines"]:
            console.print(f"  {line}")
    for d in report.get("defaults", []):
        console.print(f"default {d['field']} = {d['value']}: {d['why']}")
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report.get("estimated_steps"):
        console.print(f"plan: {report['estimated_steps']} steps, roughly {report['estimated_seconds']:.0f} s on this hardware")
    for e in report.get("errors", []):
        console.print(f"[red]cannot run:[/red] {e}")
    console.print("[green]preflight ok[/green]" if report["ok"] else "[red]preflight refused the run[/red]")


@app.command()
def preflight(
    spec_file: SpecArg,
    api: ApiOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Dry run: the plan, memory estimate, data checks and defaults for a spec, without training."""
    spec = load_spec(spec_file)
    client = _client(api)
    body = _api(_with_uploaded_dataset, client, spec)
    report = _api(client.preflight, body)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_preflight(report)
    if not report["ok"]:
        raise typer.Exit(1)


@runs_app.command("list")
def runs_list(
    api: ApiOpt = None,
    project: Annotated[Optional[str], typer.Option(help="Only this project.")] = None,
    state: Annotated[Optional[str], typer.Option(help="Only runs in this state.")] = None,
):
    """Runs, newest first."""
    runs = _api(_client(api).list_runs, project, state)
    table = Table("id", "project", "name", "state", "step", "loss", "baseline", "tuned")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in runs:
        table.add_row(
            r["id"], r["project"], r["name"], r["state"], f"{r['step']}/{r['total_steps'] or '?'}",
            fmt(r["loss"]), fmt(r["baseline_eval_loss"]), fmt(r["tuned_eval_loss"]),
        )
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, api: ApiOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """One run: state, progress, metrics, artifacts."""
    run = _api(_client(api).get_run, run_id)
    if as_json:
        print(json.dumps(run, indent=2))
    else:
        console.print(f"{run['name']} ({run['project']}): step {run['step']}/{run['total_steps'] or '?'}")
        print_summary(run)


@runs_app.command("cancel")
def runs_cancel(run_id: str, api: ApiOpt = None):
    """Cancel a run: the chunk in flight checkpoints, then the run ends cancelled."""
    run = _api(_client(api).cancel_run, run_id)
    console.print(f"cancellation requested for {run['id']} (state {run['state']})")


@runs_app.command("pause")
def runs_pause(run_id: str, api: ApiOpt = None):
    """Pause a run: the chunk in flight checkpoints and the GPU is freed."""
    run = _api(_client(api).pause_run, run_id)
    console.print(f"pause requested for {run['id']} at step {run['step']}")


@runs_app.command("resume")
def runs_resume(run_id: str, api: ApiOpt = None):
    """Resume a paused run from its newest checkpoint."""
    run = _api(_client(api).resume_run, run_id)
    console.print(f"resumed {run['id']} from step {run['step']}")


@models_app.command("make-tiny")
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    text: Annotated[Optional[Path], typer.Option(help="Text file (one sample per line) to train the tokenizer on.")] = None,
    arch: Annotated[str, typer.Option(help="llama or qwen2.")] = "llama",
    seed: Annotated[int, typer.Option(help="Weight init seed.")] = 0,
):
    """Write a random-weight causal LM plus a BPE tokenizer, loadable with from_pretrained."""
    from worker_gpu.tiny_model import make_tiny_model

    texts = None
    if text is not None:
        texts = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            _fail(f"{text} has no text lines to train the tokenizer on")
    try:
        path = make_tiny_model(out_dir, texts, arch=arch, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"tiny {arch} model written to {path}")


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


def verify_adapter(run: dict, spec: RunSpec) -> None:
    """Load the published adapter onto its base model the way a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec.base_model, local_files_only=True)
    adapter = run["adapter_path"]
    if adapter is None:  # the artifact store is remote (S3): fetch the published files
        import tempfile

        from store.artifacts import open_store

        store, prefix = open_store(Settings()), f"runs/{run['id']}/adapter"
        adapter = tempfile.mkdtemp(prefix="lockn-adapter-")
        for key in store.list(prefix):
            store.get_file(key, Path(adapter) / key.removeprefix(prefix + "/"))
    model = PeftModel.from_pretrained(base, adapter)
    tensors = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    console.print(f"  adapter loads with PeftModel.from_pretrained onto {spec.base_model} ({tensors} LoRA tensors)")


def prepare_demo(home: Path) -> tuple[Path, Path]:
    """The tiny model and dataset the demo tunes, made once under home/demo."""
    from cli.demo_data import demo_texts, write_demo_dataset
    from worker_gpu.tiny_model import make_tiny_model

    demo = home / "demo"
    model_dir, dataset = demo / "tiny-llama", demo / "instructions.jsonl"
    if not (model_dir / "config.json").exists():
        console.print(f"building a tiny random-weight Llama model and tokenizer in {model_dir}")
        make_tiny_model(model_dir, demo_texts())
    if not dataset.exists():
        write_demo_dataset(dataset)
    return model_dir, dataset


@app.command()
def demo(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="Tune this spec instead of the built-in demo.")] = None,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack up after the run (Ctrl-C stops it).")] = False,
):
    """Start the embedded stack, tune a LoRA adapter end to end, print the results."""
    from cli.stack import Stack
    from runtime.logs import configure_logging

    configure_logging("supervisor")
    settings = _settings(home)
    settings.home.mkdir(parents=True, exist_ok=True)
    if spec_file:
        spec = load_spec(spec_file)
    else:
        spec = demo_spec(*prepare_demo(settings.home))
    stack = Stack(settings)
    console.print("starting the embedded stack (Temporal dev server, API, worker_cpu, worker_gpu)")
    try:
        stack.start()
    except RuntimeError as exc:
        _fail(str(exc))
    code = 1
    try:
        client = ApiClient(settings.api_url)
        client.wait_healthy(120)
        console.print(f"API {settings.api_url} | Temporal UI {settings.temporal_ui_url} | logs {stack.logs}")
        run = submit(client, spec)
        console.print(f"run [bold]{run['id']}[/bold] submitted")
        run = follow(client, run["id"])
        print_summary(run)
        if run["state"] == "succeeded":
            verify_adapter(run, spec)
        for sample in (run.get("metrics") or {}).get("tuned", {}).get("samples", [])[:2]:
            console.print(f"  sample: {sample['prompt'][-60:]!r} -> {sample['generated'][:60]!r} (reference {sample['reference'][:40]!r})")
        code = 0 if run["state"] == "succeeded" else 1
        if keep_running:
            console.print("stack still running; Ctrl-C stops it")
            stack.run_forever(on_note=console.print)
    except ApiError as exc:
        console.print(f"[red]error:[/red] {exc}")
    except KeyboardInterrupt:
        console.print("interrupted")
    finally:
        stack.stop()
    raise typer.Exit(code)


def _redact(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is printed as its scheme only
        return url.split("://", 1)[0] + "://..."


@db_app.command("upgrade")
def db_upgrade(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
):
    """Migrate the metadata DB (LOCKN_TUNE_DATABASE_URL) in place to the newest schema. Safe to
    run while other processes start: they take turns."""
    from store.migrate import current, upgrade

    settings = _settings(home)
    before = current(settings.db_url)
    try:
        upgrade(settings.db_url, revision)
    except Exception as exc:  # noqa: BLE001 - shown to the operator with the URL it concerned
        _fail(f"could not migrate {_redact(settings.db_url)}: {exc}")
    console.print(f"{_redact(settings.db_url)}: {before or 'empty'} -> {current(settings.db_url)}")


@db_app.command("current")
def db_current(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
):
    """Print the schema revision the metadata DB is at, and the newest one."""
    from store.migrate import current, head

    settings = _settings(home)
    console.print(f"{_redact(settings.db_url)}: at {current(settings.db_url) or 'empty'}, newest {head()}")


if __name__ == "__main__":
    app()
