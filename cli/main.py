"""`lockn-tune`: the command line of LockN Tune.

    lockn-tune demo                 # the whole thing on a tiny local model, end to end
    lockn-tune up                   # the embedded stack: Temporal, API, workers
    lockn-tune down                 # stop it (also what a killed `up` left running)
    lockn-tune preflight SPEC.yaml  # dry run: plan, memory, data checks, defaults
    lockn-tune tune SPEC.yaml       # submit a run and follow it
    lockn-tune runs list|show|follow|pause|resume|cancel
    lockn-tune datasets list|delete
    lockn-tune models make-tiny DIR
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cli.api_client import ApiClient, ApiError
from schemas.run_spec import RunSpec
from schemas.settings import Settings

app = typer.Typer(help="LockN Tune: durable LoRA/QLoRA fine-tuning on Temporal.", no_args_is_help=True)
runs_app = typer.Typer(help="List, inspect, follow, pause and cancel runs.", no_args_is_help=True)
models_app = typer.Typer(help="Local models.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
datasets_app = typer.Typer(help="Uploaded datasets: list and delete.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
db_app = typer.Typer(help="The metadata database (SQLite or PostgreSQL): migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
# Piped output (scripts, logs) gets full lines rather than 80-column wrapping.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

TERMINAL = {"succeeded", "failed", "cancelled"}
SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML or JSON).", exists=True, dir_okay=False)]
ApiOpt = Annotated[Optional[str], typer.Option(
    "--api", help="API address; default: LOCKN_TUNE_API_HOST/PORT, else the stack.json `lockn-tune up` left in the home."
)]

AllowDirOpt = Annotated[Optional[list[Path]], typer.Option(
    "--allow-dir",
    help="A folder (repeatable) from which specs may name local base models and datasets, besides the home; "
    "added to LOCKN_TUNE_ALLOWED_ROOTS.",
)]


def _allowed_roots(dirs: list[Path] | None) -> str | None:
    """--allow-dir folders joined onto LOCKN_TUNE_ALLOWED_ROOTS, absolute: the services run in the home."""
    if not dirs:
        return None
    current = os.environ.get("LOCKN_TUNE_ALLOWED_ROOTS", "")
    added = [str(d.expanduser().resolve()) for d in dirs]
    return os.pathsep.join([p for p in current.split(os.pathsep) if p] + added)


def _settings(home: Path | None = None, **overrides) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home.expanduser().resolve()
    return Settings(**values)


def _api_address(api: str | None, settings: Settings) -> tuple[str, str]:
    """The API's address and where it came from, first found of: --api, LOCKN_TUNE_API_HOST/PORT,
    the stack.json that `lockn-tune up` leaves in the home, the default."""
    from cli.stack import read_stack_file

    if api:
        return api, "given with --api"
    from_env = sorted(f"LOCKN_TUNE_{name.upper()}" for name in {"api_host", "api_port"} & settings.model_fields_set)
    if from_env:
        return settings.api_url, f"from {' and '.join(from_env)}"
    found = read_stack_file(settings.home)
    if found and found.get("api_url"):
        pid = found.get("pid")
        alive = isinstance(pid, int) and Path(f"/proc/{pid}").exists()
        by = f"`lockn-tune up` pid {pid}" + ("" if alive else ", which is no longer running")
        return found["api_url"], f"from {settings.home / 'stack.json'}, written by {by}"
    return settings.api_url, f"the default: no --api, LOCKN_TUNE_API_PORT or {settings.home / 'stack.json'}"


def _client(api: str | None, home: Path | None = None) -> ApiClient:
    """A client for the stack the user means (see _api_address); `home` where the command has --home."""
    settings = _settings(home)
    url, source = _api_address(api, settings)
    hint = f"Start the stack with `lockn-tune up --home {settings.home}` (or `make up`), or name a running one with --api URL."
    return ApiClient(url, token=settings.api_token.get_secret_value() or None, source=source, start_hint=hint)


def _fail(message: str, code: int = 1):
    # Messages carry server and user text (regex patterns, paths): printed literally, never as markup.
    console.print(f"[red]error:[/red] {escape(message)}")
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
    # Local data files are uploaded (content-addressed: the same bytes keep their id), so the
    # server never reads a path of ours and the CLI works from any folder.
    for field in ("dataset", "eval_dataset"):
        value = getattr(spec, field)
        if not value or value.startswith("ds_") or not Path(value).expanduser().is_file():
            continue
        ds = client.upload_dataset(Path(value).expanduser(), spec.project)
        console.print(
            f"{field} [bold]{escape(ds['name'])}[/bold] uploaded as {ds['id']} "
            f"({ds['valid_rows']} valid {ds['shape']} rows, sha256 {ds['sha256'][:12]})"
        )
        if ds["bad_rows"]:
            console.print(f"[yellow]warning:[/yellow] {escape(ds['report']['message'])}")
        body[field] = ds["id"]
    return body


class TrainingSpeed:
    """Steps/s and ETA from the run's progress events (server timestamps, so a reattached
    CLI gets the same figures), and tokens/s as the training worker measured it (real,
    non-padding tokens per second of the last reported step). Progress recorded by older
    workers carries no token figure: then tokens/s is derived, steps/s x examples per step
    (plan) x mean tokens per row of the snapshot capped at max_seq_len, and marked ~."""

    WINDOW_S = 300.0

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.tokens_per_s: float | None = None

    def restart(self) -> None:
        """A state change (pause, resume, evaluation): the rate before it says nothing now."""
        self.samples.clear()
        self.tokens_per_s = None

    def add(self, ts: float, step: int, tokens_per_s: float | None = None) -> None:
        self.samples.append((ts, step))
        self.samples = [s for s in self.samples if s[0] >= ts - self.WINDOW_S]
        if tokens_per_s:
            self.tokens_per_s = tokens_per_s

    def steps_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def fields(self, run: dict) -> dict:
        """The bar's rate, tokens/s and ETA columns for the run as it is now."""
        rate = self.steps_per_s() if run["state"] == "training" else None
        if rate is None:
            return {"rate": "-", "tokens": "-", "eta": "-"}
        plan, snap = run.get("plan") or {}, run.get("dataset_snapshot") or {}
        mean = (snap.get("token_stats") or {}).get("mean")
        tokens = "-"
        if self.tokens_per_s:
            tokens = f"{self.tokens_per_s:,.0f}"
        elif mean and plan.get("micro_batch_size"):
            per_step = plan["micro_batch_size"] * plan.get("grad_accum", 1) * min(mean, plan.get("max_seq_len") or mean)
            tokens = f"~{rate * per_step:,.0f}"
        left = max(0, (run.get("total_steps") or 0) - run["step"])
        seconds = left / rate
        eta = time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"
        return {"rate": f"{rate:.2f}", "tokens": tokens, "eta": eta}


def follow(client: ApiClient, run_id: str) -> dict:
    """Follow a run until it ends: a live bar (state, step/total, loss, steps/s, tokens/s,
    ETA) with the run's warnings and state changes printed above it as they happen."""
    speed, last_event = TrainingSpeed(), 0
    with Progress(
        TextColumn("[bold]{task.fields[state]:<15}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "steps  loss {task.fields[loss]}  {task.fields[rate]} steps/s  {task.fields[tokens]} tok/s  "
            "ETA {task.fields[eta]}  elapsed"
        ),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(run_id, total=None, state="queued", loss="-", rate="-", tokens="-", eta="-")
        while True:
            events = client.run_events(run_id, last_event)
            for ev in events:
                last_event = max(last_event, ev["id"])
                if ev["kind"] == "progress" and ev.get("step") is not None:
                    speed.add(ev["ts"], ev["step"], (ev.get("data") or {}).get("tokens_per_s"))
                elif ev["kind"] == "state":
                    speed.restart()
                    # A failure's reason is printed once, in the summary.
                    if ev["message"] and ev["state"] not in TERMINAL:
                        bar.console.print(f"[dim]{ev['state']}: {escape(ev['message'])}[/dim]")
                elif ev["kind"] == "warning":
                    bar.console.print(f"[yellow]warning:[/yellow] {escape(ev['message'])}")
            run = client.get_run(run_id)
            loss = f"{run['loss']:.4f}" if run.get("loss") is not None else "-"
            bar.update(
                task, total=run.get("total_steps"), completed=run["step"], state=run["state"], loss=loss,
                **speed.fields(run),
            )
            if run["state"] in TERMINAL:
                return run
            if len(events) < 500:  # else catching up on a long run's history: no pause
                time.sleep(0.5)


def follow_or_detach(client: ApiClient, run_id: str) -> dict:
    """follow(), where Ctrl-C stops only the following: the run goes on on the server, and
    the CLI says how to reattach or cancel, then exits 130 (interrupted, as shells report SIGINT)."""
    try:
        return follow(client, run_id)
    except KeyboardInterrupt:
        console.print(
            f"\nstopped following; run {escape(run_id)} goes on on the server.\n"
            f"  follow it again: lockn-tune runs follow {escape(run_id)}\n"
            f"  stop it:         lockn-tune runs cancel {escape(run_id)}"
        )
        raise typer.Exit(130) from None


def print_samples(run: dict) -> None:
    """The eval samples side by side: prompt, reference, base model and tuned model outputs."""
    metrics = run.get("metrics") or {}
    base = (metrics.get("baseline") or {}).get("samples") or []
    tuned = (metrics.get("tuned") or {}).get("samples") or []
    if not tuned:
        return
    table = Table(title="eval samples: base vs tuned", show_lines=True, expand=False)
    for name in ("prompt", "reference", "base model", "tuned"):
        table.add_column(name, overflow="fold", ratio=1)
    for i, t in enumerate(tuned):
        b = base[i]["generated"] if i < len(base) and base[i]["prompt"] == t["prompt"] else "-"
        # Text(), not markup: prompts and outputs are the user's and the model's words.
        prompt = t["prompt"].strip()
        prompt = prompt if len(prompt) <= 300 else "..." + prompt[-300:]
        table.add_row(Text(prompt), Text(t["reference"]), _output(b), _output(t["generated"]))
    console.print(table)


def _output(text: str) -> Text:
    """A model's answer; an empty one is said in words, not left as a blank cell."""
    if text.strip():
        return Text(text)
    return Text("(empty: the model ended its answer at once)", style="dim")


def print_summary(run: dict, settings: Settings | None = None) -> None:
    state = run["state"]
    colour = {"succeeded": "green", "failed": "red"}.get(state, "yellow")
    console.print(f"run [bold]{escape(run['id'])}[/bold] [{colour}]{state}[/{colour}]")
    if run.get("error"):
        console.print(f"  reason: {escape(run['error'])}")
    if run.get("baseline_eval_loss") is not None:
        console.print(f"  baseline eval loss: {run['baseline_eval_loss']:.4f}")
    if run.get("tuned_eval_loss") is not None:
        delta = run["tuned_eval_loss"] - run["baseline_eval_loss"]
        console.print(f"  tuned eval loss:    {run['tuned_eval_loss']:.4f}  ({delta:+.4f})")
    if run.get("adapter_path") or run.get("adapter_uri"):
        console.print(f"  adapter:  {escape(run.get('adapter_path') or run.get('adapter_uri'))}")
    if run.get("manifest_uri"):
        console.print(f"  manifest: {escape(run['manifest_uri'])}")
    for artifact in run.get("artifacts", []):
        m = artifact["manifest"]
        console.print(
            escape(
                f"  lineage:  dataset sha256 {m['dataset']['sha256'][:12]}, spec sha256 {m['spec_sha256'][:12]}, "
                f"base {m['base_model']['id']} @ {m['base_model']['revision'][:12]}, seed {m['seed']}, "
                f"torch {m['packages']['torch']}, peft {m['packages']['peft']}, {m['code_version']}"
            )
        )
    console.print(f"  Temporal UI: {escape(run['temporal_ui_url'])}")


@app.command()
def up(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
    api_port: Annotated[Optional[int], typer.Option(help="API port.")] = None,
    temporal_port: Annotated[Optional[int], typer.Option(help="Temporal frontend port.")] = None,
    ui_port: Annotated[Optional[int], typer.Option(help="Temporal UI port.")] = None,
    allow_dir: AllowDirOpt = None,
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
        allowed_roots=_allowed_roots(allow_dir),
    )
    stack = Stack(settings)

    def interrupt(*_):
        raise KeyboardInterrupt

    # Until run_forever takes over, SIGTERM (`lockn-tune down`) interrupts like Ctrl-C, so a stop
    # requested during start-up still stops what has started instead of orphaning it.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        stack.start(on_note=lambda note: console.print(note, markup=False))
    except RuntimeError as exc:  # StackBusy included: the message names the fix
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted while starting; the services started so far were stopped", 130)
    try:
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
        console.print(f"Ctrl-C (or `lockn-tune down --home {settings.home}`) stops it; starting it again picks up unfinished runs.")
        stack.run_forever(on_note=console.print)
    except KeyboardInterrupt:
        pass  # stopped before run_forever began watching: stopped below all the same
    finally:
        stack.stop()  # a no-op after run_forever's own clean stop


@app.command()
def down(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
):
    """Stop the stack on a home: its supervisor stops the services cleanly (a chunk in flight
    checkpoints); services left by a supervisor that died are stopped here."""
    from cli.stack import stop_home

    settings = _settings(home)
    if not stop_home(settings.home, on_note=lambda note: console.print(note, markup=False)):
        raise typer.Exit(1)


@app.command()
def tune(
    spec_file: SpecArg,
    api: ApiOpt = None,
    no_follow: Annotated[bool, typer.Option("--no-follow", help="Submit and return.")] = False,
):
    """Submit a tuning run and follow it to the end.

    Shows preflight warnings, a progress bar (step, loss, tokens/s, ETA), then the summary and
    base-vs-tuned samples. Ctrl-C stops following only (exit 130): the run goes on, and
    `lockn-tune runs follow RUN_ID` reattaches."""
    spec = load_spec(spec_file)
    client = _client(api)
    try:
        run = submit(client, spec)
        console.print(f"run [bold]{escape(run['id'])}[/bold] submitted; Temporal UI: {escape(run['temporal_ui_url'])}")
        if no_follow:
            return
        run = follow_or_detach(client, run["id"])
    except ApiError as exc:
        _fail(str(exc))
    print_summary(run)
    print_samples(run)
    if run["state"] != "succeeded":
        raise typer.Exit(1)


def print_preflight(report: dict) -> None:
    """The preflight report for a person: verdict, hardware, memory, data, defaults."""
    hw = report.get("hardware") or {}
    device = f"GPU {hw.get('gpu_name')} ({hw.get('gpu_memory_bytes', 0) / 1e9:.0f} GB)" if hw.get("device") == "cuda" else (
        f"CPU only ({hw.get('cpu_count')} cores, {(hw.get('memory_available_bytes') or 0) / 1e9:.0f} GB free): "
        "training runs on the CPU, slowly"
    )
    console.print(escape(f"hardware: {device}; bitsandbytes {'usable' if hw.get('bitsandbytes_usable') else 'not usable'}"))
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
            console.print(f"  [yellow]{escape(p['reason'])}[/yellow]")
        for sample in ds["samples"][:1]:
            # Chat templates are full of brackets ([INST], <|im_start|>): print the text literally.
            console.print(f"  sample (line {sample['line']}), as the model sees it:")
            console.print(sample["text"], markup=False, highlight=False)
            console.print(f"  ...of which it learns: {sample['trained_text']!r}", markup=False, highlight=False)
    mem = report.get("memory")
    if mem:
        console.print(escape(
            f"memory: needs {mem['estimate_bytes'] / 1e9:.2f} GB of {mem['available_bytes'] / 1e9:.1f} GB usable on {mem['device']}"
        ))
        for line in mem["lines"]:
            console.print(f"  {escape(line)}")
    for d in report.get("defaults", []):
        console.print(escape(f"default {d['field']} = {d['value']}: {d['why']}"))
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    if report.get("estimated_steps"):
        console.print(f"plan: {report['estimated_steps']} steps, roughly {report['estimated_seconds']:.0f} s on this hardware")
    for e in report.get("errors", []):
        console.print(f"[red]cannot run:[/red] {escape(e)}")
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
            r["id"], r["project"], Text(r["name"]), r["state"], f"{r['step']}/{r['total_steps'] or '?'}",
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
        console.print(escape(f"{run['name']} ({run['project']}): step {run['step']}/{run['total_steps'] or '?'}"))
        print_summary(run)
        print_samples(run)


@runs_app.command("follow")
def runs_follow(run_id: str, api: ApiOpt = None):
    """Reattach to a run in any state and follow it to its end.

    A finished run prints its summary at once. Ctrl-C stops following only (exit 130).
    Exits 0 when the run succeeded, else 1."""
    client = _client(api)
    run = _api(client.get_run, run_id)
    if run["state"] not in TERMINAL:
        console.print(escape(f"following {run['id']} ({run['name']}, {run['state']}); Ctrl-C stops following, not the run"))
        try:
            run = follow_or_detach(client, run_id)
        except ApiError as exc:
            _fail(str(exc))
    print_summary(run)
    print_samples(run)
    if run["state"] != "succeeded":
        raise typer.Exit(1)


@runs_app.command("cancel")
def runs_cancel(run_id: str, api: ApiOpt = None):
    """Cancel a run: the chunk in flight checkpoints, then the run ends cancelled."""
    run = _api(_client(api).cancel_run, run_id)
    console.print(escape(f"cancellation requested for {run['id']} (state {run['state']})"))


@runs_app.command("pause")
def runs_pause(run_id: str, api: ApiOpt = None):
    """Pause a run: the chunk in flight checkpoints and the GPU is freed."""
    run = _api(_client(api).pause_run, run_id)
    console.print(escape(f"pause requested for {run['id']} at step {run['step']}"))


@runs_app.command("resume")
def runs_resume(run_id: str, api: ApiOpt = None):
    """Resume a paused run from its newest checkpoint."""
    run = _api(_client(api).resume_run, run_id)
    console.print(escape(f"resumed {run['id']} from step {run['step']}"))


@datasets_app.command("list")
def datasets_list(
    api: ApiOpt = None,
    project: Annotated[Optional[str], typer.Option(help="Only this project.")] = None,
):
    """Uploaded datasets, with their ids (what a spec's `dataset: ds_...` names)."""
    rows = _api(_client(api).list_datasets, project)
    table = Table("id", "project", "name", "shape", "valid rows", "size", "sha256", "uploaded", "runs")
    for d in rows:
        runs = d.get("runs") or []
        active = sum(1 for r in runs if r["state"] not in TERMINAL)
        table.add_row(
            d["id"], d["project"], Text(d["name"]), d.get("shape") or "-",
            f"{d['valid_rows']}/{d['total_rows']}", f"{d['size_bytes'] / 1e6:.2f} MB", d["sha256"][:12],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(d["created_at"])),
            f"{len(runs)} ({active} not ended)" if active else str(len(runs)),
        )
    console.print(table if rows else "no datasets" + (escape(f" in project {project}") if project else ""))


@datasets_app.command("delete")
def datasets_delete(dataset_id: str, api: ApiOpt = None):
    """Delete an uploaded dataset. Refused (with the API's reason) while a run uses it."""
    _api(_client(api).delete_dataset, dataset_id)
    console.print(escape(f"dataset {dataset_id} deleted"))


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
    console.print(escape(f"tiny {arch} model written to {path}"))


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

        from store.open_store import open_store

        store, prefix = open_store(Settings()), f"runs/{run['id']}/adapter"
        adapter = tempfile.mkdtemp(prefix="lockn-adapter-")
        for key in store.list(prefix):
            store.get_file(key, Path(adapter) / key.removeprefix(prefix + "/"))
    model = PeftModel.from_pretrained(base, adapter)
    tensors = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    console.print(escape(f"  adapter loads with PeftModel.from_pretrained onto {spec.base_model} ({tensors} LoRA tensors)"))


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


@app.command()
def demo(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="Tune this spec instead of the built-in demo.")] = None,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack up after the run (Ctrl-C stops it).")] = False,
    allow_dir: AllowDirOpt = None,
):
    """Start the embedded stack, tune a LoRA adapter end to end, print the results."""
    from cli.stack import Stack
    from runtime.logs import configure_logging

    configure_logging("supervisor")
    settings = _settings(home, allowed_roots=_allowed_roots(allow_dir))
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
    console.print(escape(f"{_redact(settings.db_url)}: {before or 'empty'} -> {current(settings.db_url)}"))


@db_app.command("current")
def db_current(
    home: Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")] = None,
):
    """Print the schema revision the metadata DB is at, and the newest one."""
    from store.migrate import current, head

    settings = _settings(home)
    console.print(escape(f"{_redact(settings.db_url)}: at {current(settings.db_url) or 'empty'}, newest {head()}"))


if __name__ == "__main__":
    app()
