"""Which paths on the server a spec or request may name.

A path a user sends (a dataset file, a base-model folder, an eval file, and later any export
destination) is used only when, after `~`, `..` and every symbolic link are resolved, it lies
under one of the allowed roots: the stack home, the Hugging Face hub cache, and the folders
in LOCKN_TUNE_ALLOWED_ROOTS (`lockn-tune up --allow-dir`). Anything else is refused before
it is opened, so nothing of it can reach a report, a run, a response or a log. Uploaded
datasets (POST /v1/datasets) need no root: they live in the artifact store.

The API checks a spec before it starts a workflow (a 422 naming the field); worker_cpu checks
again where it reads, so a workflow started another way meets the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath

from schemas.settings import Settings

HOW_TO_ALLOW = (
    "or allow its folder on the server: add it to LOCKN_TUNE_ALLOWED_ROOTS (folders separated by "
    f"{os.pathsep!r}) or pass `lockn-tune up --allow-dir FOLDER`, then restart the stack"
)
UPLOAD = "upload it (POST /v1/datasets, or `lockn-tune tune`, which uploads a local dataset for you)"
INSTEAD = {
    "dataset": UPLOAD,
    "eval_dataset": UPLOAD,
    "base_model": "copy the model folder under one of those folders, or name a Hugging Face model id in the worker's cache",
}


class PathRefused(ValueError):
    """A path outside the allowed roots (or not a usable path): the message names the field,
    lists the roots and says what to do. It never contains anything read from the path."""


def allowed_roots(settings: Settings) -> tuple[Path, ...]:
    """The folders local paths may lie under, each resolved (a root may itself be a symlink)."""
    from huggingface_hub import constants

    roots: list[Path] = []
    for root in (settings.home, Path(constants.HF_HUB_CACHE), *settings.allowed_root_paths):
        try:
            resolved = Path(root).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            continue  # an unusable root allows nothing
        if resolved not in roots:
            roots.append(resolved)
    return tuple(roots)


def allowed_path(value: str, field: str, roots: Sequence[Path]) -> Path:
    """`value` as a resolved path under one of `roots`, or PathRefused.

    The one rule for every server path a spec or request carries (dataset, eval_dataset,
    base_model, and any export destination to come). The answer does not depend on whether
    the path exists, so a refusal tells nothing about files outside the roots; callers check
    existence afterwards, on the returned (resolved) path.
    """
    try:
        # Not strict: a missing file resolves as far as it exists, and symlinks on the way
        # (dangling ones too) are still followed, so they cannot point out of a root.
        resolved = Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # NUL bytes, symlink loops, unknown ~user
        raise PathRefused(
            f"{field} {value!r} is not a usable path on the server (allowed folders: {_listed(roots)}). "
            + _what_to_do(field)
        ) from None
    if within_roots(resolved, roots):
        return resolved
    raise PathRefused(
        f"{field} {value!r} is outside the folders this server reads local files from "
        f"({_listed(roots)}), after following '..' and symbolic links. " + _what_to_do(field)
    )


def within_roots(path: Path, roots: Sequence[Path]) -> bool:
    """Whether an already resolved path lies under one of the roots."""
    return any(path.is_relative_to(root) for root in roots)


def names_a_path(value: str) -> bool:
    """Whether a base_model value is unmistakably a path rather than a Hugging Face id
    (ids are `name` or `org/name`: never absolute, never `~`, `.` or `..`)."""
    return (
        value.startswith(("/", "~", "."))
        or "\\" in value
        or "\x00" in value
        or ".." in PurePath(value).parts
    )


def _listed(roots: Sequence[Path]) -> str:
    return ", ".join(map(str, roots)) or "none"


def _what_to_do(field: str) -> str:
    return f"To use it, {INSTEAD.get(field, 'give a path under one of those folders')}; {HOW_TO_ALLOW}."
