"""`lockn-tune`: the command line of LockN Tune. This module holds the commands; what they
print is in cli/render.py, the demo in cli/demo.py, `db` in cli/db_admin.py.

    lockn-tune demo                 # the whole thing on a tiny local model, end to end
    lockn-tune up                   # the embedded stack: Temporal, API, workers
    lockn-tune down                 # stop it (also what a killed `up` left running)
    lockn-tune preflight SPEC.yaml  # dry run: plan, memory, data checks, defaults
    lockn-tune tune SPEC.yaml       # submit a run and follow it
    lockn-tune runs list|show|follow|pause|resume|cancel
    lockn-tune datasets list|delete
    lockn-tune models make-tiny DIR
    lockn-tune db upgrade|current
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.api_client import ApiError
from cli.db_admin import db_app, redact
from cli.demo import demo_spec, prepare_demo, run_demo
from cli.options import AllowDirOpt, ApiOpt, HomeOpt, SpecArg, allowed_roots, client_for, settings_for
from cli.render import (
    console,
    ended,
    fail,
    follow_or_detach,
    print_datasets,
    print_preflight,
    print_run_header,
    print_runs,
    print_samples,
    print_summary,
)
from cli.spec_file import load_spec, request_body, submit

app = typer.Typer(help="LockN Tune: durable LoRA/QLoRA fine-tuning on Temporal.", no_args_is_help=True)
runs_app = typer.Typer(help="List, inspect, follow, pause and cancel runs.", no_args_is_help=True)
models_app = typer.Typer(help="Local models.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
datasets_app = typer.Typer(help="Uploaded datasets: list and delete.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(db_app, name="db")


def _api(call, *args):
    """Call the API; an error becomes a one-line message and exit code 1."""
    try:
        return call(*args)
    except ApiError as exc:
        fail(str(exc))


@app.command()
def up(
    home: HomeOpt = None,
    api_port: Annotated[Optional[int], typer.Option(help="API port.")] = None,
    temporal_port: Annotated[Optional[int], typer.Option(help="Temporal frontend port.")] = None,
    ui_port: Annotated[Optional[int], typer.Option(help="Temporal UI port.")] = None,
    allow_dir: AllowDirOpt = None,
):
    """Start the embedded stack and keep it running until Ctrl-C. Unfinished runs continue."""
    from cli.stack import Stack
    from runtime.logs import configure_logging

    configure_logging("supervisor")
    settings = settings_for(
        home,
        api_port=api_port,
        temporal_address=f"127.0.0.1:{temporal_port}" if temporal_port else None,
        temporal_ui_port=ui_port,
        allowed_roots=allowed_roots(allow_dir),
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
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted while starting; the services started so far were stopped", 130)
    try:
        console.print(f"LockN Tune is up (home {settings.home})")
        console.print(f"  API:         {settings.api_url}  (docs {settings.api_url}/docs)")
        console.print(f"  Temporal UI: {settings.temporal_ui_url}")
        console.print(f"  logs:        {stack.logs}")
        if settings.auth_enabled:
            console.print(f"  auth:        OIDC tokens from {settings.oidc_issuer} (audience {settings.oidc_audience})")
        else:
            console.print("  auth:        off (embedded stack: one local user with admin on every project)")
        console.print(f"  metadata:    {redact(settings.db_url)}")
        store = f"s3://{settings.s3_bucket} at {settings.s3_endpoint}" if settings.artifact_store == "s3" else settings.artifacts_root
        console.print(f"  artifacts:   {store}")
        console.print(f"Ctrl-C (or `lockn-tune down --home {settings.home}`) stops it; starting it again picks up unfinished runs.")
        stack.run_forever(on_note=console.print)
    except KeyboardInterrupt:
        pass  # stopped before run_forever began watching: stopped below all the same
    finally:
        stack.stop()  # a no-op after run_forever's own clean stop


@app.command()
def down(home: HomeOpt = None):
    """Stop the stack on a home: its supervisor stops the services cleanly (a chunk in flight
    checkpoints); services left by a supervisor that died are stopped here."""
    from cli.stack import stop_home

    settings = settings_for(home)
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
    client = client_for(api)
    try:
        run = submit(client, spec)
        console.print(f"run [bold]{escape(run['id'])}[/bold] submitted; Temporal UI: {escape(run['temporal_ui_url'])}")
        if no_follow:
            return
        run = follow_or_detach(client, run["id"])
    except ApiError as exc:
        fail(str(exc))
    print_summary(run)
    print_samples(run)
    if run["state"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def preflight(
    spec_file: SpecArg,
    api: ApiOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Dry run: the plan, memory estimate, data checks and defaults for a spec, without training."""
    spec = load_spec(spec_file)
    client = client_for(api)
    body = _api(request_body, client, spec)
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
    print_runs(_api(client_for(api).list_runs, project, state))


@runs_app.command("show")
def runs_show(run_id: str, api: ApiOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """One run: state, progress, metrics, artifacts."""
    run = _api(client_for(api).get_run, run_id)
    if as_json:
        print(json.dumps(run, indent=2))
    else:
        print_run_header(run)
        print_summary(run)
        print_samples(run)


@runs_app.command("follow")
def runs_follow(run_id: str, api: ApiOpt = None):
    """Reattach to a run in any state and follow it to its end.

    A finished run prints its summary at once. Ctrl-C stops following only (exit 130).
    Exits 0 when the run succeeded, else 1."""
    client = client_for(api)
    run = _api(client.get_run, run_id)
    if not ended(run["state"]):
        console.print(escape(f"following {run['id']} ({run['name']}, {run['state']}); Ctrl-C stops following, not the run"))
        try:
            run = follow_or_detach(client, run_id)
        except ApiError as exc:
            fail(str(exc))
    print_summary(run)
    print_samples(run)
    if run["state"] != "succeeded":
        raise typer.Exit(1)


@runs_app.command("cancel")
def runs_cancel(run_id: str, api: ApiOpt = None):
    """Cancel a run: the chunk in flight checkpoints, then the run ends cancelled."""
    run = _api(client_for(api).cancel_run, run_id)
    console.print(escape(f"cancellation requested for {run['id']} (state {run['state']})"))


@runs_app.command("pause")
def runs_pause(run_id: str, api: ApiOpt = None):
    """Pause a run: the chunk in flight checkpoints and the GPU is freed."""
    run = _api(client_for(api).pause_run, run_id)
    console.print(escape(f"pause requested for {run['id']} at step {run['step']}"))


@runs_app.command("resume")
def runs_resume(run_id: str, api: ApiOpt = None):
    """Resume a paused run from its newest checkpoint."""
    run = _api(client_for(api).resume_run, run_id)
    console.print(escape(f"resumed {run['id']} from step {run['step']}"))


@datasets_app.command("list")
def datasets_list(
    api: ApiOpt = None,
    project: Annotated[Optional[str], typer.Option(help="Only this project.")] = None,
):
    """Uploaded datasets, with their ids (what a spec's `dataset: ds_...` names)."""
    print_datasets(_api(client_for(api).list_datasets, project), project)


@datasets_app.command("delete")
def datasets_delete(dataset_id: str, api: ApiOpt = None):
    """Delete an uploaded dataset. Refused (with the API's reason) while a run uses it."""
    _api(client_for(api).delete_dataset, dataset_id)
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
            fail(f"{text} has no text lines to train the tokenizer on")
    try:
        path = make_tiny_model(out_dir, texts, arch=arch, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    console.print(escape(f"tiny {arch} model written to {path}"))


@app.command()
def demo(
    home: HomeOpt = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="Tune this spec instead of the built-in demo.")] = None,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack up after the run (Ctrl-C stops it).")] = False,
    allow_dir: AllowDirOpt = None,
):
    """Start the embedded stack, tune a LoRA adapter end to end, print the results."""
    from runtime.logs import configure_logging

    configure_logging("supervisor")
    settings = settings_for(home, allowed_roots=allowed_roots(allow_dir))
    settings.home.mkdir(parents=True, exist_ok=True)
    spec = load_spec(spec_file) if spec_file else demo_spec(*prepare_demo(settings.home))
    raise typer.Exit(run_demo(settings, spec, keep_running))


if __name__ == "__main__":
    app()
