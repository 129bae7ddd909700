"""The local artifact store and checkpoint commit/verify, on a real filesystem."""

from __future__ import annotations

import pytest

from store.artifacts import LocalArtifactStore, UnsafeKey
from store.checkpoints import commit_checkpoint, committed_steps, fetch_latest_checkpoint


@pytest.fixture
def store(tmp_path):
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "", "a\\..\\b"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(UnsafeKey):
        store.put_bytes(key, b"x")


def test_put_get_list_and_sha256(store, tmp_path):
    import hashlib

    assert store.put_bytes("a/b.txt", b"hello") == hashlib.sha256(b"hello").hexdigest()
    src = tmp_path / "f.bin"
    src.write_bytes(b"\x00" * 3_000_000)
    assert store.put_file("a/c.bin", src) == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.list("a") == ["a/b.txt", "a/c.bin"]
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.get_file("a/c.bin", tmp_path / "out" / "c.bin").read_bytes() == src.read_bytes()
    assert not list((tmp_path / "artifacts").rglob("*.tmp-*"))
    assert store.delete_prefix("a") == 2 and store.list("a") == []


def _checkpoint(tmp_path, step: int):
    d = tmp_path / f"staging-{step}"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(f"weights {step}".encode())
    (d / "trainer_state.pt").write_bytes(f"state {step}".encode())
    return d


def test_newest_committed_checkpoint_wins(store, tmp_path):
    for step in (10, 20):
        commit_checkpoint(store, "run_a", step, _checkpoint(tmp_path, step), meta={})
    # Files of step 30 are up, but its manifest never was: it does not exist.
    store.put_bytes("runs/run_a/checkpoints/000000030/trainer_state.pt", b"half")
    assert committed_steps(store, "run_a") == [20, 10]
    ref, manifest, path = fetch_latest_checkpoint(store, "run_a", tmp_path / "dl")
    assert ref.step == 20 and (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights 20"


def test_corrupt_checkpoint_is_skipped_for_the_one_before(store, tmp_path):
    for step in (10, 20):
        commit_checkpoint(store, "run_b", step, _checkpoint(tmp_path, step), meta={})
    store.local_path("runs/run_b/checkpoints/000000020/trainer_state.pt").write_bytes(b"bit rot")
    ref, _, path = fetch_latest_checkpoint(store, "run_b", tmp_path / "dl")
    assert ref.step == 10 and (path / "trainer_state.pt").read_bytes() == b"state 10"


def test_no_checkpoint_means_start_fresh(store, tmp_path):
    assert fetch_latest_checkpoint(store, "run_none", tmp_path / "dl") is None


def test_retention_keeps_the_newest_and_the_best_eval(store, tmp_path):
    from store.checkpoints import prune_checkpoints

    evals = {10: 3.0, 20: 1.5, 30: 2.5, 40: 2.0, 50: 2.2}
    for step, loss in evals.items():
        commit_checkpoint(store, "run_r", step, _checkpoint(tmp_path, step), meta={"eval_loss": loss})
    assert prune_checkpoints(store, "run_r", keep_last=2) == [30, 10]
    assert committed_steps(store, "run_r") == [50, 40, 20]
    assert store.list("runs/run_r/checkpoints/000000030") == []
    ref, _, _ = fetch_latest_checkpoint(store, "run_r", tmp_path / "dl")
    assert ref.step == 50
