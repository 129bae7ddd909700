"""A run spec from a file to the API: read and validated, local paths made absolute, local
dataset files uploaded, then submitted."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError
from rich.markup import escape

from cli.api_client import ApiClient
from cli.render import console, fail
from schemas.run_spec import RunSpec


def load_spec(path: Path) -> RunSpec:
    """Read a YAML/JSON spec; a wrong field is reported with its name."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read spec {path}: {exc}")
    if not isinstance(raw, dict):
        fail(f"spec {path} must be a mapping of fields (base_model, dataset, ...)")
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        fail(f"spec {path} is not valid:\n" + "\n".join(lines))


def submit(client: ApiClient, spec: RunSpec) -> dict:
    """Upload a local dataset file first, so the run works from an immutable copy."""
    return client.create_run(request_body(client, spec))


def request_body(client: ApiClient, spec: RunSpec) -> dict:
    """The spec as the API takes it (for a run or a preflight), its local dataset files uploaded."""
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
