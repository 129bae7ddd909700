"""Where everything lives in the artifact store, and what a checkpoint holds: the one place
that knows the keys. Everything else asks this module.

    datasets/sha256/<sha256>.jsonl              raw dataset files, content-addressed
    runs/<run>/data/{train,eval}.jsonl          the run's tokenized snapshot
    runs/<run>/checkpoints/<step:09d>/          one committed checkpoint:
        manifest.json                             written last; names every file with its sha256
        adapter/                                  the PEFT adapter (what publish copies)
        trainer_state.pt                          optimizer, scheduler, RNG
        cursor.json                               step, epoch, data position, every step's loss
    runs/<run>/adapter/                         the published adapter:
        adapter_model.safetensors, adapter_config.json (from the checkpoint)
        README.md                                 the model card
        lockn-manifest.json                       lineage, written last
    models/<org>--<name>/<commit>/              a base model fetched from the Hugging Face Hub:
        manifest.json                             written last; the commit, every file's sha256 and size
        files/                                    the repo's files at that commit, as the Hub serves them
"""

from __future__ import annotations

# Inside a checkpoint directory (the same names in the store and in a local staging copy).
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_ADAPTER_DIR = "adapter"
CHECKPOINT_STATE_FILE = "trainer_state.pt"
CHECKPOINT_CURSOR_FILE = "cursor.json"

# Inside a published adapter.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CARD = "README.md"
ADAPTER_MANIFEST = "lockn-manifest.json"

# Inside a stored base model.
MODEL_MANIFEST = "manifest.json"
MODEL_FILES_DIR = "files"

STEP_DIGITS = 9


def dataset_key(sha256: str) -> str:
    """A raw dataset file, stored once per content however many uploads or runs name it."""
    return f"datasets/sha256/{sha256}.jsonl"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


def snapshot_key(run_id: str, split: str) -> str:
    """The run's tokenized rows of one split ('train' or 'eval')."""
    return f"{run_prefix(run_id)}/data/{split}.jsonl"


def checkpoints_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/checkpoints"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{checkpoints_prefix(run_id)}/{step:0{STEP_DIGITS}d}"


def checkpoint_dir_name(step: int) -> str:
    """A checkpoint's directory name (also used for local copies)."""
    return f"{step:0{STEP_DIGITS}d}"


def checkpoint_manifest_key(run_id: str, step: int) -> str:
    return f"{checkpoint_prefix(run_id, step)}/{CHECKPOINT_MANIFEST}"


def checkpoint_file_key(run_id: str, step: int, rel: str) -> str:
    return f"{checkpoint_prefix(run_id, step)}/{rel}"


def checkpoint_step(key: str, run_id: str) -> int | None:
    """The step of a checkpoint manifest key of this run; None for any other key."""
    head = checkpoints_prefix(run_id) + "/"
    if not key.startswith(head):
        return None
    parts = key[len(head) :].split("/")
    if len(parts) == 2 and parts[1] == CHECKPOINT_MANIFEST and parts[0].isdigit():
        return int(parts[0])
    return None


def checkpoint_adapter_file(rel: str) -> str | None:
    """A checkpoint file's name inside the adapter, or None when the file is not the adapter's."""
    head = CHECKPOINT_ADAPTER_DIR + "/"
    return rel[len(head) :] if rel.startswith(head) else None


def adapter_prefix(run_id: str) -> str:
    """Where a run's adapter is published."""
    return f"{run_prefix(run_id)}/adapter"


def adapter_manifest_key(run_id: str) -> str:
    return f"{adapter_prefix(run_id)}/{ADAPTER_MANIFEST}"


def model_folder(repo_id: str) -> str:
    """A Hub repo's folder name: 'org/name' becomes 'org--name', as in the Hugging Face cache.
    Unambiguous, since the Hub refuses '--' inside repo ids."""
    return repo_id.replace("/", "--")


def model_prefix(repo_id: str, commit_sha: str) -> str:
    """A base model's files at one Hub commit: content-addressed, so a cluster stores it once."""
    return f"models/{model_folder(repo_id)}/{commit_sha}"


def model_manifest_key(repo_id: str, commit_sha: str) -> str:
    return f"{model_prefix(repo_id, commit_sha)}/{MODEL_MANIFEST}"


def model_file_key(repo_id: str, commit_sha: str, rel: str) -> str:
    return f"{model_prefix(repo_id, commit_sha)}/{MODEL_FILES_DIR}/{rel}"
