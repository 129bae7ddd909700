"""`lockn-tune db`: the metadata database's schema migrations (upgrade, current), and database
URLs made safe to print."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from cli.options import HomeOpt, settings_for
from cli.render import console, fail

db_app = typer.Typer(help="The metadata database (SQLite or PostgreSQL): migrations.", no_args_is_help=True)


def redact(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is printed as its scheme only
        return url.split("://", 1)[0] + "://..."


@db_app.command("upgrade")
def db_upgrade(
    home: HomeOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
):
    """Migrate the metadata DB (LOCKN_TUNE_DATABASE_URL) in place to the newest schema. Safe to
    run while other processes start: they take turns."""
    from store.migrate import current, upgrade

    settings = settings_for(home)
    before = current(settings.db_url)
    try:
        upgrade(settings.db_url, revision)
    except Exception as exc:  # noqa: BLE001 - shown to the operator with the URL it concerned
        fail(f"could not migrate {redact(settings.db_url)}: {exc}")
    console.print(escape(f"{redact(settings.db_url)}: {before or 'empty'} -> {current(settings.db_url)}"))


@db_app.command("current")
def db_current(home: HomeOpt = None):
    """Print the schema revision the metadata DB is at, and the newest one."""
    from store.migrate import current, head

    settings = settings_for(home)
    console.print(escape(f"{redact(settings.db_url)}: at {current(settings.db_url) or 'empty'}, newest {head()}"))
