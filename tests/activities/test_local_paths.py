"""The server-path rule: a local dataset or base model is used only under the allowed roots,
after `~`, `..` and symlinks are resolved; anything else is refused before it is opened."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.base_model import local_model_dir, resolve_base_model
from activities.local_paths import PathRefused, allowed_path, allowed_roots, names_a_path
from activities.preflight import resolve_dataset_path
from cli.stack import settings_env
from schemas.settings import Settings

OPENED: list[str] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; this one only appends to a list


@pytest.fixture
def tree(tmp_path):
    """root/ (allowed) with a file, an escaping symlink and a dangling one; outside/ with a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "data.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    secret = outside / "secret.jsonl"
    secret.write_text('{"prompt": "SECRET", "completion": "SECRET"}\n')
    (root / "link.jsonl").symlink_to(secret)
    (root / "dangling.jsonl").symlink_to(outside / "not-yet.jsonl")
    (root / "model").mkdir()
    (tmp_path / "root-link").symlink_to(root)
    return {"root": root.resolve(), "outside": outside, "secret": secret, "tmp": tmp_path}


def test_inside_a_root_is_allowed_by_any_spelling(tree):
    roots = (tree["root"],)
    data = tree["root"] / "data.jsonl"
    assert allowed_path(str(data), "dataset", roots) == data
    assert allowed_path(f"{tree['root']}/model/../data.jsonl", "dataset", roots) == data
    assert allowed_path(str(tree["tmp"] / "root-link" / "data.jsonl"), "dataset", roots) == data
    # A root that is itself a symlink is resolved too.
    via_link = allowed_roots(Settings(home=tree["tmp"] / "home", allowed_roots=str(tree["tmp"] / "root-link")))
    assert tree["root"] in via_link
    assert allowed_path(str(data), "dataset", via_link) == data
    missing = tree["root"] / "later.jsonl"
    assert allowed_path(str(missing), "dataset", roots) == missing  # existence is the caller's check


@pytest.mark.parametrize("how", ["plain", "dotdot", "symlink", "dangling", "proc", "etc", "home"])
def test_outside_every_root_is_refused_with_what_to_do(tree, how):
    roots = (tree["root"],)
    value = {
        "plain": str(tree["secret"]),
        "dotdot": f"{tree['root']}/../outside/secret.jsonl",
        "symlink": str(tree["root"] / "link.jsonl"),
        "dangling": str(tree["root"] / "dangling.jsonl"),
        "proc": "/proc/self/environ",
        "etc": "/etc/passwd",
        "home": "~/.bashrc",
    }[how]
    with pytest.raises(PathRefused) as refused:
        allowed_path(value, "dataset", roots)
    message = str(refused.value)
    assert message.startswith(f"dataset {value!r} is outside the folders this server reads local files from")
    assert str(tree["root"]) in message
    assert "LOCKN_TUNE_ALLOWED_ROOTS" in message and "lockn-tune up --allow-dir" in message
    assert "POST /v1/datasets" in message and "lockn-tune tune" in message


def test_a_refusal_tells_nothing_about_what_exists_outside(tree):
    roots = (tree["root"],)
    there, absent = str(tree["secret"]), str(tree["outside"] / "absent.jsonl")
    with pytest.raises(PathRefused) as a:
        allowed_path(there, "dataset", roots)
    with pytest.raises(PathRefused) as b:
        allowed_path(absent, "dataset", roots)
    assert str(a.value).replace(there, "X") == str(b.value).replace(absent, "X")


def test_unusable_paths_are_refused_not_crashed(tree):
    loop = tree["root"] / "loop"
    loop.symlink_to(loop)
    for value in ("/tmp/a\x00b", str(loop / "x.jsonl"), "~no-such-user-here/x.jsonl"):
        with pytest.raises(PathRefused, match="dataset .* (is not a usable path|is outside the folders)"):
            allowed_path(value, "dataset", (tree["root"],))


def test_hub_ids_are_not_paths_and_paths_are():
    for hub_id in ("gpt2", "Qwen/Qwen3-8B", "meta-llama/Llama-3.2-1B-Instruct", "org/name.v2"):
        assert not names_a_path(hub_id), hub_id
    for path in ("/models/x", "./x", "../x", "~/x", "org/../../etc", "a\\b"):
        assert names_a_path(path), path


def test_base_model_folders_follow_the_same_rule(tree, monkeypatch):
    roots = (tree["root"],)
    assert local_model_dir("Qwen/Qwen3-8B", roots) is None
    assert local_model_dir(str(tree["root"] / "model"), roots) == tree["root"] / "model"
    with pytest.raises(PathRefused, match="^base_model .* is outside the folders"):
        local_model_dir(str(tree["outside"]), roots)
    with pytest.raises(PathRefused, match="copy the model folder under one of those folders"):
        local_model_dir(f"{tree['root']}/../outside", roots)
    # A bare relative name is a local folder only inside a root; elsewhere it is a hub id.
    monkeypatch.chdir(tree["root"])
    assert local_model_dir("model", roots) == tree["root"] / "model"
    monkeypatch.chdir(tree["tmp"])
    assert local_model_dir("outside", roots) is None


def test_workers_refuse_before_opening_anything(tree):
    roots = (tree["root"],)
    OPENED.clear()
    for value in (str(tree["secret"]), str(tree["root"] / "link.jsonl"), "/proc/self/environ"):
        with pytest.raises(ApplicationError) as failed:
            resolve_dataset_path(value, None, None, roots=roots)
        assert failed.value.non_retryable and failed.value.type == "UserError"
        assert "outside the folders" in failed.value.message and "SECRET" not in failed.value.message
        with pytest.raises(ApplicationError, match="eval_dataset .* outside the folders"):
            resolve_dataset_path(value, None, None, roots=roots, field="eval_dataset")
    with pytest.raises(ApplicationError) as failed:
        resolve_base_model(str(tree["outside"]), roots=roots)
    assert failed.value.message.startswith("base_model ") and "outside the folders" in failed.value.message
    touched = [p for p in OPENED if p.startswith(str(tree["outside"])) or p == "/proc/self/environ"]
    assert touched == []
    path, name = resolve_dataset_path(str(tree["root"] / "data.jsonl"), None, None, roots=roots)
    assert path == tree["root"] / "data.jsonl" and name == "data.jsonl"


def test_the_default_roots_are_home_and_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("LOCKN_TUNE_ALLOWED_ROOTS", raising=False)
    roots = allowed_roots(Settings(home=tmp_path / "home"))
    assert roots == ((tmp_path / "home").resolve(), Path(constants.HF_HUB_CACHE).resolve())
    for path in ("/etc/shadow", "/proc/self/environ", "/dev/zero", str(Path.home() / ".ssh" / "id_rsa")):
        with pytest.raises(PathRefused):
            allowed_path(path, "dataset", roots)


def test_the_setting_travels_from_up_to_its_children(tmp_path, monkeypatch):
    """`lockn-tune up` passes settings to its services as environment variables (str(value))."""
    a, b = tmp_path / "a b", tmp_path / "c"
    settings = Settings(home=tmp_path / "home", allowed_roots=os.pathsep.join([str(a), str(b)]))
    for key in [k for k in os.environ if k.startswith("LOCKN_TUNE_")]:
        monkeypatch.delenv(key)
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    child = Settings()
    assert child.allowed_root_paths == [a, b]
    assert allowed_roots(child) == allowed_roots(settings)
