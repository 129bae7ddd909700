"""Finding the base model's weights on this machine, and naming them for lineage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from activities.errors import user_error
from activities.local_paths import PathRefused, allowed_path, names_a_path, within_roots
from store.artifacts import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def load_tokenizer(path: str | Path):
    """The base model's tokenizer from its local files, with eos as the pad token where it has none.

    Loads no weights, so CPU activities (preflight, snapshot) tokenize with it; transformers
    itself imports torch, though, so the first call costs torch's import time.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class ResolvedBaseModel:
    """A base model found on disk: where its files are, which revision, and its config."""

    path: Path
    revision: str  # hub commit, or sha256 over the local weight files
    config: dict
    manifest_key: str | None = None  # the artifact-store manifest of a model fetched from the Hub


def local_model_dir(name: str, roots: Sequence[Path]) -> Path | None:
    """The resolved local folder a base_model value names, or None for a Hugging Face id.

    An absolute, `~`, `.` or `..` value is a path and must lie under `roots` (PathRefused
    otherwise). A bare `name` or `org/name` is a local folder only where it resolves to a
    directory inside the roots (relative to the working directory); anywhere else it is a
    hub id, so nothing outside the roots is even looked at.
    """
    if names_a_path(name):
        return allowed_path(name, "base_model", roots)
    try:
        candidate = Path(name).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return candidate if within_roots(candidate, roots) and candidate.is_dir() else None


def cached_snapshot(name: str) -> Path | None:
    """The folder of a Hub id in this worker's Hugging Face cache; None when it is not there
    (or `name` is no valid repo id)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def fetched_from_hub(name: str, roots: Sequence[Path]) -> bool:
    """Whether a run's base_model comes from the Hub (fetch_base_model): a valid repo id that
    names no local folder under the roots and no model in this worker's Hugging Face cache.
    Anything else is resolve_base_model's, which finds it or says what is wrong with it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if local_model_dir(name, roots) is not None:
            return False
        validate_repo_id(name)
    except (PathRefused, HFValidationError):
        return False
    return cached_snapshot(name) is None


def resolve_base_model(name: str, *, roots: Sequence[Path] = ()) -> ResolvedBaseModel:
    """A local model directory under the allowed roots, or a hub id already in the local
    Hugging Face cache. A folder outside the roots is refused before anything in it is read.
    A run fetches any other Hub id first (activities/hub_fetch.py stored_base_model)."""
    try:
        path = local_model_dir(name, roots)
    except PathRefused as exc:
        raise user_error(str(exc)) from None
    if path is not None:
        if not path.is_dir():
            raise user_error(f"base_model {name!r} does not exist on the worker (or is not a folder); check the path")
        if not (path / "config.json").is_file():
            raise user_error(
                f"base_model {name!r} is a directory without config.json; point it at a directory "
                "written by save_pretrained (config.json, weights and tokenizer files)"
            )
        revision = weights_sha256(path)
    else:
        path = cached_snapshot(name)
        if path is None:
            raise user_error(
                f"base_model {name!r} is neither a local directory under the allowed folders nor in this worker's "
                f"Hugging Face cache; a run fetches a Hugging Face model id (org/name) from the Hub before its "
                f"preflight, a dry run does not: start the run, run `hf download {name}` on the worker, or give "
                "the absolute path of a local directory"
            )
        revision = path.name
    return model_in_folder(name, path, revision)


def model_in_folder(name: str, path: Path, revision: str, manifest_key: str | None = None) -> ResolvedBaseModel:
    """The base model in a folder that holds its config.json, refused when it has no weights."""
    config = json.loads((path / "config.json").read_text())
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise user_error(f"base_model {name!r} has no weight files (*.safetensors or *.bin) in {path}")
    return ResolvedBaseModel(path=path, revision=revision, config=config, manifest_key=manifest_key)


def weights_sha256(path: Path) -> str:
    """One sha256 naming the exact local weights: over each weight file's name and sha256."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def count_parameters(path: Path) -> tuple[int, list[str]]:
    """Parameter count and linear-layer names, read from safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total, linear = 0, set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
                parts = key.split(".")
                if len(shape) == 2 and parts[-1] == "weight" and len(parts) >= 2 and "embed" not in parts[-2]:
                    linear.add(parts[-2])
    return total, sorted(linear)
