"""What the CLI prints: API answers (preflight reports, runs, datasets, eval samples) turned
into terminal output, the live progress of a run, and error messages."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cli.api_client import ApiClient
from schemas.run_state import RunState

# Piped output (scripts, logs) gets full lines rather than 80-column wrapping.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def ended(state: str) -> bool:
    """Whether a run in this state is over (succeeded, failed or cancelled)."""
    return RunState(state).terminal


def fail(message: str, code: int = 1):
    """Print an error and exit with `code`."""
    # Messages carry server and user text (regex patterns, paths): printed literally, never as markup.
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


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
        hp, snap = (run.get("plan") or {}).get("hyperparameters") or {}, run.get("dataset_snapshot") or {}
        mean = (snap.get("token_stats") or {}).get("mean")
        tokens = "-"
        if self.tokens_per_s:
            tokens = f"{self.tokens_per_s:,.0f}"
        elif mean and hp.get("micro_batch_size"):
            per_step = hp["micro_batch_size"] * hp.get("grad_accum", 1) * min(mean, hp.get("max_seq_len") or mean)
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
                    if ev["message"] and not ended(ev["state"]):
                        bar.console.print(f"[dim]{ev['state']}: {escape(ev['message'])}[/dim]")
                elif ev["kind"] == "warning":
                    bar.console.print(f"[yellow]warning:[/yellow] {escape(ev['message'])}")
            run = client.get_run(run_id)
            loss = f"{run['loss']:.4f}" if run.get("loss") is not None else "-"
            bar.update(
                task, total=run.get("total_steps"), completed=run["step"], state=run["state"], loss=loss,
                **speed.fields(run),
            )
            if ended(run["state"]):
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


def print_summary(run: dict) -> None:
    """A run's outcome: state, the reason it failed, eval losses, adapter, lineage, Temporal UI."""
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


def print_run_header(run: dict) -> None:
    """The line `runs show` opens with: name, project, progress."""
    console.print(escape(f"{run['name']} ({run['project']}): step {run['step']}/{run['total_steps'] or '?'}"))


def print_runs(runs: list[dict]) -> None:
    """The runs table: id, project, name, state, progress, losses."""
    table = Table("id", "project", "name", "state", "step", "loss", "baseline", "tuned")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in runs:
        table.add_row(
            r["id"], r["project"], Text(r["name"]), r["state"], f"{r['step']}/{r['total_steps'] or '?'}",
            fmt(r["loss"]), fmt(r["baseline_eval_loss"]), fmt(r["tuned_eval_loss"]),
        )
    console.print(table)


def print_datasets(rows: list[dict], project: str | None) -> None:
    """The datasets table, with how many runs use each and how many of those have not ended."""
    table = Table("id", "project", "name", "shape", "valid rows", "size", "sha256", "uploaded", "runs")
    for d in rows:
        runs = d.get("runs") or []
        active = sum(1 for r in runs if not ended(r["state"]))
        table.add_row(
            d["id"], d["project"], Text(d["name"]), d.get("shape") or "-",
            f"{d['valid_rows']}/{d['total_rows']}", f"{d['size_bytes'] / 1e6:.2f} MB", d["sha256"][:12],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(d["created_at"])),
            f"{len(runs)} ({active} not ended)" if active else str(len(runs)),
        )
    console.print(table if rows else "no datasets" + (escape(f" in project {project}") if project else ""))
