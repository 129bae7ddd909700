"""The artifact store contract, run against the local store and the S3 store on a real
S3-protocol server (moto_server on loopback); and its callers on both: checkpoints
(commit, fallback, retention), preflight reading an uploaded dataset, publish.

    .venv/bin/python -m pytest -q tests/store/test_artifact_stores.py
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from schemas.settings import Settings
from store.artifacts import ArtifactCorrupt, ArtifactStoreError, LocalArtifactStore, UnsafeKey
from store.open_store import open_store
from store.checkpoints import commit_checkpoint, committed_steps, fetch_latest_checkpoint, prune_checkpoints
from store.s3 import S3ArtifactStore
from tests.s3_server import S3Server

PART = 5 * 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same store interface on local disk and on a fresh S3 bucket (under a key prefix)."""
    if request.param == "local":
        store = open_store(Settings(home=tmp_path / "home"))
        assert isinstance(store, LocalArtifactStore)
    else:
        server = request.getfixturevalue("s3_server")
        store = open_store(server.settings(tmp_path / "home", s3_prefix="team-a", s3_part_size=PART))
        assert isinstance(store, S3ArtifactStore)
    return store


@pytest.fixture
def s3_store(s3_server, tmp_path):
    return open_store(s3_server.settings(tmp_path / "home", s3_prefix="team-a", s3_part_size=PART))


@pytest.fixture
def db(tmp_path):
    from store.blocking import BlockingDatabase

    db = BlockingDatabase(f"sqlite:///{tmp_path / 'meta.db'}")
    yield db
    db.close()


def tamper(store, key: str, data: bytes) -> None:
    """Change a blob's bytes behind the store's back: on disk, or in the bucket keeping the
    sha256 metadata the store wrote."""
    if isinstance(store, S3ArtifactStore):
        name = store.object_name(key)
        meta = store.client.stat_object(store.bucket, name).metadata
        store.client.put_object(
            store.bucket, name, io.BytesIO(data), len(data), metadata={"sha256": meta["x-amz-meta-sha256"]}
        )
    else:
        store.local_path(key).write_bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_and_files_round_trip_with_their_sha256(store, tmp_path):
    assert store.put_bytes("a/b.txt", b"hello") == sha(b"hello")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3_000_000))
    assert store.put_file("a/c.bin", src) == sha(src.read_bytes())
    assert store.get_bytes("a/b.txt") == b"hello"
    out = store.get_file("a/c.bin", tmp_path / "out" / "c.bin")
    assert out == tmp_path / "out" / "c.bin" and out.read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c.bin"]  # no temporary file left behind
    # Rewriting a key replaces the blob.
    assert store.put_bytes("a/b.txt", b"hello again") == sha(b"hello again")
    assert store.get_bytes("a/b.txt") == b"hello again"


def test_local_writes_leave_no_temporary_files(tmp_path):
    """The filesystem store writes under a temporary name and renames: nothing half-written stays."""
    store = LocalArtifactStore(tmp_path / "artifacts")
    src = tmp_path / "f.bin"
    src.write_bytes(b"\x00" * 3_000_000)
    store.put_bytes("a/b.txt", b"hello")
    store.put_file("a/c.bin", src)
    store.get_file("a/c.bin", tmp_path / "out" / "c.bin")
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert store.list("a") == ["a/b.txt", "a/c.bin"]


def test_list_exists_and_delete_prefix(store):
    for key in ("a/b.txt", "a/c/d.bin", "a/c/e.bin", "ab/f.txt", "top.txt"):
        store.put_bytes(key, key.encode())
    assert store.list("a") == ["a/b.txt", "a/c/d.bin", "a/c/e.bin"]  # never "ab/..."
    assert store.list("a/") == store.list("a")
    assert store.list("a/c") == ["a/c/d.bin", "a/c/e.bin"]
    assert store.list("a/b.txt") == ["a/b.txt"]
    assert store.list("nothing/here") == []
    assert store.list("") == ["a/b.txt", "a/c/d.bin", "a/c/e.bin", "ab/f.txt", "top.txt"]
    assert store.exists("a/c/d.bin") and not store.exists("a/c") and not store.exists("a/zzz")
    assert store.delete_prefix("a/c/") == 2
    assert store.delete_prefix("a") == 1
    assert store.delete_prefix("a") == 0
    assert store.list("") == ["ab/f.txt", "top.txt"]
    assert not store.exists("a/b.txt")


def test_delete_prefix_removes_many_keys_in_one_batch(store):
    keys = [f"runs/r/checkpoints/000000010/shard-{i:03d}.bin" for i in range(40)]
    for key in keys:
        store.put_bytes(key, b"x")
    assert store.delete_prefix("runs/r") == 40
    assert store.list("runs") == []


def test_missing_blob_is_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        store.get_bytes("nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        store.get_file("nope.txt", tmp_path / "out" / "nope.txt")
    assert not (tmp_path / "out" / "nope.txt").exists()


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "", "a\\..\\b"])
def test_unsafe_keys_are_refused(store, key, tmp_path):
    with pytest.raises(UnsafeKey):
        store.put_bytes(key, b"x")
    with pytest.raises(UnsafeKey):
        store.get_bytes(key)
    with pytest.raises(UnsafeKey):
        store.get_file(key, tmp_path / "dl" / "x")
    with pytest.raises(UnsafeKey):
        store.exists(key)
    if key:  # "" lists the whole store
        with pytest.raises(UnsafeKey):
            store.list(key)


def test_multipart_upload_of_a_file_larger_than_a_part(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))  # 3 parts of 5 MiB (the last one shorter)
    digest = sha(src.read_bytes())
    assert store.put_file("runs/r/big.bin", src) == digest
    assert store.get_file("runs/r/big.bin", tmp_path / "dl" / "big.bin").read_bytes() == src.read_bytes()
    if isinstance(store, S3ArtifactStore):
        stat = store.client.stat_object(store.bucket, store.object_name("runs/r/big.bin"))
        # A multipart upload's ETag is md5-of-part-md5s with the part count appended.
        assert stat.etag.endswith("-3"), stat.etag
        assert stat.metadata["x-amz-meta-sha256"] == digest
        assert stat.size == src.stat().st_size


def test_small_uploads_are_single_part(s3_store, tmp_path):
    s3_store.put_bytes("small.bin", b"x" * 1000)
    assert "-" not in s3_store.client.stat_object(s3_store.bucket, s3_store.object_name("small.bin")).etag


def test_keys_live_under_the_prefix_and_uris_name_the_bucket(store, tmp_path):
    store.put_bytes("runs/r/adapter/adapter_config.json", b"{}")
    if isinstance(store, S3ArtifactStore):
        assert store.uri("runs/r/adapter") == f"s3://{store.bucket}/team-a/runs/r/adapter"
        names = [o.object_name for o in store.client.list_objects(store.bucket, recursive=True)]
        assert names == ["team-a/runs/r/adapter/adapter_config.json"]
        assert store.local_path("runs/r/adapter") is None
    else:
        assert store.uri("runs/r/adapter") == (tmp_path / "home" / "artifacts" / "runs/r/adapter").as_uri()
        assert store.local_path("runs/r/adapter").is_dir()
    assert store.list("runs") == ["runs/r/adapter/adapter_config.json"]


def test_tampered_object_is_detected_on_read(s3_store, tmp_path):
    good = s3_store.put_bytes("runs/r/data/train.jsonl", b'{"text": "good"}\n')
    tamper(s3_store, "runs/r/data/train.jsonl", b'{"text": "evil"}\n')
    with pytest.raises(ArtifactCorrupt) as caught:
        s3_store.get_bytes("runs/r/data/train.jsonl")
    message = str(caught.value)
    assert "runs/r/data/train.jsonl" in message and good in message and sha(b'{"text": "evil"}\n') in message
    dest = tmp_path / "dl" / "train.jsonl"
    with pytest.raises(ArtifactCorrupt):
        s3_store.get_file("runs/r/data/train.jsonl", dest)
    assert list((tmp_path / "dl").iterdir()) == []  # neither the file nor its temporary name


def test_tampered_multipart_object_is_detected_on_read(s3_store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    s3_store.put_file("big.bin", src)
    flipped = bytearray(src.read_bytes())
    flipped[7 * 1024 * 1024] ^= 1
    tamper(s3_store, "big.bin", bytes(flipped))
    with pytest.raises(ArtifactCorrupt, match="big.bin"):
        s3_store.get_file("big.bin", tmp_path / "dl" / "big.bin")


def test_local_file_is_a_cached_copy_named_by_sha256(store, tmp_path):
    store.put_bytes("datasets/sha256/abc.jsonl", b'{"text": "one"}\n')
    path = store.local_file("datasets/sha256/abc.jsonl")
    assert path.read_bytes() == b'{"text": "one"}\n'
    if isinstance(store, S3ArtifactStore):
        assert path == tmp_path / "home" / "cache" / "sha256" / f"{sha(path.read_bytes())}.jsonl"
        before = path.stat().st_mtime_ns
        assert store.local_file("datasets/sha256/abc.jsonl") == path  # no second download
        assert path.stat().st_mtime_ns == before
        # A blob rewritten under the same key is fetched again.
        store.put_bytes("datasets/sha256/abc.jsonl", b'{"text": "two"}\n')
        again = store.local_file("datasets/sha256/abc.jsonl")
        assert again != path and again.read_bytes() == b'{"text": "two"}\n'
    else:
        assert path == store.local_path("datasets/sha256/abc.jsonl")
    with pytest.raises(FileNotFoundError):
        store.local_file("datasets/sha256/missing.jsonl")


def test_preflight_reads_an_uploaded_dataset_from_the_store(store, db):
    """A dataset uploaded to the store (ds_...) is readable by preflight and snapshot,
    wherever the store is."""
    from temporalio.exceptions import ApplicationError

    from activities.preflight import resolve_dataset_path
    from store.tables import DatasetRow

    data = b'{"instruction": "say hi", "output": "hi"}\n' * 3
    key = f"datasets/sha256/{sha(data)}.jsonl"
    store.put_bytes(key, data)
    db.add_dataset(
        DatasetRow(
            id="ds_one", project="default", name="hi.jsonl", sha256=sha(data), size_bytes=len(data),
            shape="instruction", total_rows=3, valid_rows=3, bad_rows=0, store_key=key, report={},
        )
    )
    path, name = resolve_dataset_path("ds_one", db, store)
    assert name == "hi.jsonl" and path.read_bytes() == data
    # Gone from the store: the run fails with a message that says so, not from a stale cache.
    store.delete_prefix(key)
    with pytest.raises(ApplicationError, match="missing from the artifact store"):
        resolve_dataset_path("ds_one", db, store)


def _checkpoint(tmp_path, step: int):
    d = tmp_path / f"staging-{step}"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(f"weights {step}".encode())
    (d / "trainer_state.pt").write_bytes(f"state {step}".encode())
    return d


def test_files_without_a_manifest_are_not_a_checkpoint(store, tmp_path):
    for step in (10, 20):
        commit_checkpoint(store, "run_a", step, _checkpoint(tmp_path, step), meta={})
    # Files of step 30 are up, but its manifest never was: it does not exist.
    store.put_bytes("runs/run_a/checkpoints/000000030/trainer_state.pt", b"half")
    store.put_bytes("runs/run_a/checkpoints/000000030/adapter/adapter_model.safetensors", b"half")
    assert committed_steps(store, "run_a") == [20, 10]
    ref, manifest, path = fetch_latest_checkpoint(store, "run_a", tmp_path / "dl")
    assert ref.step == 20 and ref.manifest_key == "runs/run_a/checkpoints/000000020/manifest.json"
    assert (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights 20"
    assert ref.manifest_sha256 == sha(store.get_bytes(ref.manifest_key))
    assert set(manifest["files"]) == {"adapter/adapter_model.safetensors", "trainer_state.pt"}


def test_commit_is_idempotent_for_a_step(store, tmp_path):
    first = commit_checkpoint(store, "run_i", 10, _checkpoint(tmp_path, 10), meta={})
    again = commit_checkpoint(store, "run_i", 10, tmp_path / "staging-10", meta={})
    assert again.step == first.step == 10
    assert committed_steps(store, "run_i") == [10]
    assert len(store.list("runs/run_i/checkpoints/000000010")) == 3


def test_rewritten_newest_checkpoint_falls_back_to_the_one_before(store, tmp_path):
    """Bytes that no longer match the manifest (rewritten through the store, so the object's
    own sha256 is consistent): the manifest's sha256 catches it."""
    for step in (10, 20):
        commit_checkpoint(store, "run_b", step, _checkpoint(tmp_path, step), meta={})
    store.put_bytes("runs/run_b/checkpoints/000000020/trainer_state.pt", b"bit rot")
    ref, _, path = fetch_latest_checkpoint(store, "run_b", tmp_path / "dl")
    assert ref.step == 10 and (path / "trainer_state.pt").read_bytes() == b"state 10"


def test_corrupted_newest_checkpoint_falls_back_to_the_one_before(store, tmp_path):
    """Bytes changed behind the store's back (bit rot, a stray writer); on S3 the object's
    sha256 metadata catches it on download."""
    for step in (10, 20):
        commit_checkpoint(store, "run_c", step, _checkpoint(tmp_path, step), meta={})
    tamper(store, "runs/run_c/checkpoints/000000020/adapter/adapter_model.safetensors", b"weights 2X")
    ref, _, path = fetch_latest_checkpoint(store, "run_c", tmp_path / "dl")
    assert ref.step == 10 and (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights 10"


def test_corrupted_manifest_falls_back_to_the_one_before(store, tmp_path):
    for step in (10, 20):
        commit_checkpoint(store, "run_m", step, _checkpoint(tmp_path, step), meta={})
    tamper(store, "runs/run_m/checkpoints/000000020/manifest.json", b'{"files": ')  # cut short
    ref, _, _ = fetch_latest_checkpoint(store, "run_m", tmp_path / "dl")
    assert ref.step == 10


def test_no_checkpoint_means_start_fresh(store, tmp_path):
    assert fetch_latest_checkpoint(store, "run_none", tmp_path / "dl") is None


def test_retention_keeps_the_newest_and_the_best_eval(store, tmp_path):
    evals = {10: 3.0, 20: 1.5, 30: 2.5, 40: 2.0, 50: 2.2}
    for step, loss in evals.items():
        commit_checkpoint(store, "run_r", step, _checkpoint(tmp_path, step), meta={"eval_loss": loss})
    assert prune_checkpoints(store, "run_r", keep_last=2) == [30, 10]
    assert committed_steps(store, "run_r") == [50, 40, 20]
    assert store.list("runs/run_r/checkpoints/000000030") == []
    assert store.list("runs/run_r/checkpoints/000000010") == []
    ref, _, _ = fetch_latest_checkpoint(store, "run_r", tmp_path / "dl")
    assert ref.step == 50


def test_unreachable_endpoint_says_where_and_what_to_do(s3_server, tmp_path):
    from tests.stack_process import free_port

    settings = s3_server.settings(tmp_path / "home", s3_endpoint=f"127.0.0.1:{free_port()}")
    with pytest.raises(ArtifactStoreError) as caught:
        open_store(settings)
    message = str(caught.value)
    assert settings.s3_endpoint in message and settings.s3_bucket in message
    assert "unreachable" in message and "LOCKN_TUNE_S3_ENDPOINT" in message


def test_refused_credentials_say_which_settings_to_check(tmp_path):
    # A second server that authenticates every request: the test keys are unknown to it.
    with S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        settings = strict.settings(tmp_path / "home")
        with pytest.raises(ArtifactStoreError) as caught:
            open_store(settings)
    message = str(caught.value)
    assert strict.endpoint in message and settings.s3_bucket in message
    assert "refused the credentials" in message and "LOCKN_TUNE_S3_ACCESS_KEY" in message
    assert settings.s3_secret_key.get_secret_value() not in message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"s3_part_size": 1024}, "S3_PART_SIZE"), ({"s3_endpoint": "http://minio:9000"}, "S3_ENDPOINT")],
)
def test_bad_settings_are_refused_with_the_setting_named(s3_server, tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"LOCKN_TUNE_{field}"):
        open_store(s3_server.settings(tmp_path / "home", **overrides))


def test_an_existing_bucket_is_reused(s3_server, tmp_path):
    settings = s3_server.settings(tmp_path / "home")
    open_store(settings).put_bytes("k.txt", b"kept")
    assert open_store(settings).get_bytes("k.txt") == b"kept"


def _publish_input(run_id: str, ref):
    from schemas.activities import DatasetSnapshot, EvalResult, PublishInput, TokenStats, TrainingPlan
    from schemas.run_spec import ResolvedHyperparameters
    from tests.conftest import small_spec

    spec = small_spec("tiny-llama", "data.jsonl")
    plan = TrainingPlan(
        run_id=run_id, spec=spec, spec_sha256=spec.sha256(), base_model_path="/models/tiny-llama",
        base_model_id="tiny-llama", base_model_revision="r0", model_type="llama", num_parameters=1000,
        has_chat_template=False, dataset_shape="instruction", valid_rows=12, train_rows=10, eval_rows=2,
        steps_per_epoch=2, total_steps=20, warmup_steps=0, memory_estimates={8: 1},
        hyperparameters=ResolvedHyperparameters(
            epochs=1, learning_rate=1e-3, warmup_ratio=0.0, lora_r=4, lora_alpha=8, max_seq_len=96,
            micro_batch_size=8, grad_accum=1, gradient_checkpointing=False,
        ),
    )
    stats = TokenStats(min=1, max=2, mean=1.5, p50=1, p95=2, truncated_rows=0, truncated_share=0.0, trained_tokens=9)
    snapshot = DatasetSnapshot(
        sha256="d" * 64, source_uri="datasets/sha256/d.jsonl", train_uri=f"runs/{run_id}/data/train.jsonl",
        train_sha256="t" * 64, eval_uri=f"runs/{run_id}/data/eval.jsonl", eval_sha256="e" * 64,
        shape="instruction", total_rows=12, bad_rows=0, train_rows=10, eval_rows=2, token_stats=stats,
    )
    baseline = EvalResult(label="baseline", loss=3.0, perplexity=20.1, tokens=9)
    tuned = EvalResult(label="tuned", loss=2.0, perplexity=7.4, tokens=9)
    return PublishInput(run_id=run_id, plan=plan, snapshot=snapshot, checkpoint=ref, baseline=baseline, tuned=tuned)


def _trained_checkpoint(tmp_path, step: int):
    d = _checkpoint(tmp_path, step)
    (d / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (d / "cursor.json").write_text('{"losses": [3.0, 2.5]}')
    return d


def test_publish_copies_the_adapter_and_writes_its_manifest(store, db, tmp_path):
    from activities.publish import publish_adapter

    ref = commit_checkpoint(store, "run_p", 20, _trained_checkpoint(tmp_path, 20), meta={})
    result = publish_adapter(_publish_input("run_p", ref), db, store)
    # The adapter, its model card (not PEFT's template) and the lineage manifest.
    assert store.list("runs/run_p/adapter") == [
        "runs/run_p/adapter/README.md",
        "runs/run_p/adapter/adapter_config.json",
        "runs/run_p/adapter/adapter_model.safetensors",
        "runs/run_p/adapter/lockn-manifest.json",
    ]
    assert "run `run_p`" in store.get_bytes("runs/run_p/adapter/README.md").decode()
    assert store.get_bytes("runs/run_p/adapter/adapter_model.safetensors") == b"weights 20"
    manifest = json.loads(store.get_bytes("runs/run_p/adapter/lockn-manifest.json"))
    assert manifest["files"]["adapter_model.safetensors"]["sha256"] == sha(b"weights 20")
    assert manifest["metrics"]["final_train_loss"] == 2.5 and manifest["parent"]["step"] == 20
    assert result.adapter_uri == store.uri("runs/run_p/adapter")
    assert result.manifest_sha256 == sha(store.get_bytes("runs/run_p/adapter/lockn-manifest.json"))
    row = db.get_artifact("art_run_p_adapter")
    assert row.uri == result.adapter_uri and row.sha256 == sha(b"weights 20")
    if isinstance(store, S3ArtifactStore):
        assert result.adapter_uri == f"s3://{store.bucket}/team-a/runs/run_p/adapter"
        assert result.adapter_path is None and row.path is None
    else:
        assert (Path(result.adapter_path) / "adapter_model.safetensors").read_bytes() == b"weights 20"


def test_publish_refuses_a_corrupted_checkpoint_and_publishes_nothing(store, db, tmp_path):
    from temporalio.exceptions import ApplicationError

    from activities.publish import publish_adapter

    ref = commit_checkpoint(store, "run_q", 20, _trained_checkpoint(tmp_path, 20), meta={})
    tamper(store, "runs/run_q/checkpoints/000000020/adapter/adapter_model.safetensors", b"weights 2X")
    with pytest.raises(ApplicationError, match="adapter_model.safetensors") as caught:
        publish_adapter(_publish_input("run_q", ref), db, store)
    assert caught.value.non_retryable
    assert "runs/run_q/adapter/adapter_model.safetensors" not in store.list("runs/run_q/adapter")
    assert db.get_artifact("art_run_q_adapter") is None
