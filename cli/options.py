"""The options several commands share, and what they resolve to: settings for a home, the
allowed roots, and the API a command talks to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.api_client import ApiClient
from schemas.settings import Settings

SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML or JSON).", exists=True, dir_okay=False)]
ApiOpt = Annotated[Optional[str], typer.Option(
    "--api", help="API address; default: LOCKN_TUNE_API_HOST/PORT, else the stack.json `lockn-tune up` left in the home."
)]
HomeOpt = Annotated[Optional[Path], typer.Option(help="State directory (default LOCKN_TUNE_HOME or ~/.lockn-tune).")]
AllowDirOpt = Annotated[Optional[list[Path]], typer.Option(
    "--allow-dir",
    help="A folder (repeatable) from which specs may name local base models and datasets, besides the home; "
    "added to LOCKN_TUNE_ALLOWED_ROOTS.",
)]


def allowed_roots(dirs: list[Path] | None) -> str | None:
    """--allow-dir folders joined onto LOCKN_TUNE_ALLOWED_ROOTS, absolute: the services run in the home."""
    if not dirs:
        return None
    current = os.environ.get("LOCKN_TUNE_ALLOWED_ROOTS", "")
    added = [str(d.expanduser().resolve()) for d in dirs]
    return os.pathsep.join([p for p in current.split(os.pathsep) if p] + added)


def settings_for(home: Path | None = None, **overrides) -> Settings:
    """Settings from the environment, with --home and the options given (None: not given) on top."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home.expanduser().resolve()
    return Settings(**values)


def api_address(api: str | None, settings: Settings) -> tuple[str, str]:
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


def client_for(api: str | None, home: Path | None = None) -> ApiClient:
    """A client for the stack the user means (see api_address); `home` where the command has --home."""
    settings = settings_for(home)
    url, source = api_address(api, settings)
    hint = f"Start the stack with `lockn-tune up --home {settings.home}` (or `make up`), or name a running one with --api URL."
    return ApiClient(url, token=settings.api_token.get_secret_value() or None, source=source, start_hint=hint)
