"""Inputs and outputs of the workflow and its activities.

Payloads carry references (URIs, sha256s) and small metrics, never tensors or files.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from schemas.datasets import TokenLengths
from schemas.hardware import HardwareInfo
from schemas.run_spec import ResolvedHyperparameters, RunSpec
from schemas.run_state import RunState, RunStatus


class RunInput(BaseModel):
    """Input of the TuneLLM workflow."""

    run_id: str
    spec: RunSpec
    cpu_task_queue: str = Field(description="Task queue of worker_cpu (preflight, data, publish, events).")
    gpu_task_queue: str = Field(description="Task queue of worker_gpu (eval, training).")
    heartbeat_timeout_s: float = Field(30.0, description="GPU activities silent this long are retried elsewhere.")
    carry: "RunCarry | None" = Field(None, description="Progress carried over by continue-as-new.")


class RunResult(BaseModel):
    run_id: str
    state: RunState
    baseline_eval_loss: float
    tuned_eval_loss: float
    adapter_uri: str
    manifest_uri: str


class RecordEventInput(BaseModel):
    """A state transition or notable event, written to the metadata DB. Idempotent on (run_id, seq)."""

    run_id: str
    seq: int
    state: RunState
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict, description="The event's own facts (what changed).")
    status: RunStatus | None = Field(
        None, description="The run's whole status after the event: the run's row is written from it."
    )
    attach: dict[str, Any] = Field(
        default_factory=dict, description="Large facts kept on the run's row only: plan, dataset_snapshot, metrics."
    )


class TrainingPlan(BaseModel):
    """The resolved plan: everything training needs, decided before a GPU is touched.

    Each fact is held once: the batch shape and max_seq_len live in `hyperparameters`, and
    the memory estimate is looked up for the current micro-batch. A change to the plan (the
    out-of-memory back-off) is a pure function that returns a new plan (`with_micro_batch`)."""

    run_id: str
    spec: RunSpec
    spec_sha256: str
    base_model_path: str = Field(
        description="Local directory the weights load from, on the machine that made the plan. For a model "
        "fetched into the artifact store each worker derives its own from base_model_manifest_key."
    )
    base_model_id: str = Field(description="What the user named (hub id or directory).")
    base_model_revision: str = Field(description="Hub commit, or sha256 of the local weight files.")
    base_model_manifest_key: str | None = Field(
        None, description="Artifact-store manifest of a base model fetched from the Hub (fetch_base_model); every "
        "worker materialises the model from it. None: a local directory or the worker's Hugging Face cache."
    )
    model_type: str
    num_parameters: int
    has_chat_template: bool
    dataset_shape: str
    dataset_sha256: str | None = Field(
        None, description="sha256 of the dataset file the plan was made from; the snapshot refuses any other bytes."
    )
    eval_dataset_sha256: str | None = Field(None, description="sha256 of the eval_dataset file, when the spec has one.")
    valid_rows: int
    train_rows: int
    eval_rows: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    memory_estimates: dict[int, int] = Field(
        default_factory=dict,
        description="Estimated peak training bytes by micro-batch size: the planned one and every smaller one "
        "the out-of-memory back-off may pick.",
    )
    warnings: list[str] = Field(default_factory=list)
    hyperparameters: ResolvedHyperparameters = Field(description="Every hyperparameter as resolved by preflight.")
    precision: str = Field("float32", description="Compute dtype: bfloat16 on GPUs that support it, else float32.")

    @property
    def hp(self) -> ResolvedHyperparameters:
        """The hyperparameters training uses (short for `hyperparameters`)."""
        return self.hyperparameters

    @property
    def micro_batch_size(self) -> int:
        return self.hyperparameters.micro_batch_size

    @property
    def grad_accum(self) -> int:
        return self.hyperparameters.grad_accum

    @property
    def max_seq_len(self) -> int:
        return self.hyperparameters.max_seq_len

    @property
    def batching(self) -> str:
        """'padded' or 'padding_free' (worker_gpu/packing.py); the same loss either way."""
        return self.hyperparameters.batching

    @property
    def memory_estimate_bytes(self) -> int | None:
        """Estimated peak training memory at the current micro-batch; None when not estimated."""
        return self.memory_estimates.get(self.micro_batch_size)

    def smaller_micro_batch(self) -> int | None:
        """The micro-batch the out-of-memory back-off tries next: the largest divisor of the
        current one up to half of it, so the examples per step stay the same; None below 2."""
        mbs = self.micro_batch_size
        return next((d for d in range(mbs // 2, 0, -1) if mbs % d == 0), None)

    def with_micro_batch(self, micro_batch_size: int) -> "TrainingPlan":
        """The same plan at another micro-batch that divides the current one: accumulation
        grows to keep the examples per step (so data order and schedule are unchanged), and
        everything derived from the batch shape follows (the memory estimate is looked up)."""
        mbs = self.micro_batch_size
        if micro_batch_size < 1 or mbs % micro_batch_size:
            raise ValueError(f"micro-batch {micro_batch_size} does not divide the planned {mbs}")
        hp = self.hyperparameters.model_copy(
            update={"micro_batch_size": micro_batch_size, "grad_accum": self.grad_accum * (mbs // micro_batch_size)}
        )
        return self.model_copy(update={"hyperparameters": hp})


class FetchModelInput(BaseModel):
    """Input of fetch_base_model: a Hugging Face Hub repo at a revision, fetched for a run."""

    run_id: str = Field(description="The run whose events report the download.")
    repo_id: str = Field(description="The Hub repo, e.g. 'Qwen/Qwen2.5-0.5B-Instruct'.")
    revision: str = Field("main", description="Branch, tag or commit sha; resolved to a commit sha.")
    spec: RunSpec | None = Field(
        None, description="The run's spec when the fetch is a run's step (repo_id is its base_model): a local "
        "directory or a model in the worker's Hugging Face cache is then not fetched, and a model-matrix model "
        "whose method cannot fit `hardware` is refused before any download."
    )
    hardware: HardwareInfo | None = Field(None, description="The training worker's hardware report; None: unknown.")


class FetchedModel(BaseModel):
    """A base model in the artifact store at one Hub commit; GPU workers materialise it from here."""

    repo_id: str
    revision: str = Field(description="The revision as asked for (branch, tag or commit).")
    commit_sha: str = Field(description="The Hub commit the revision resolved to: the model's lineage.")
    store_prefix: str = Field(description="Artifact-store prefix of the model (store/layout.py model_prefix).")
    manifest_key: str = Field(description="Its manifest, written last: every file with its sha256 and size.")
    manifest_sha256: str
    files: list[str] = Field(default_factory=list, description="The repo's files, relative to the model directory.")
    bytes: int = Field(0, description="Total size of the files.")
    reused: bool = Field(False, description="True when the store already held this commit and nothing was downloaded.")


class SnapshotInput(BaseModel):
    run_id: str
    plan: TrainingPlan


class TokenStats(TokenLengths):
    """Token lengths of the train split as the snapshot tokenized it, and what truncation did."""

    truncated_rows: int
    truncated_share: float
    trained_tokens: int = Field(description="Tokens that carry loss (assistant/completion) in the train split.")
    answer_lost_rows: int = Field(0, description="Train rows cut so short by max_seq_len that no answer token is left.")


class DatasetSnapshot(BaseModel):
    """An immutable, tokenized snapshot of the dataset with its deterministic split."""

    sha256: str = Field(description="sha256 of the raw dataset file as given.")
    source_uri: str = Field(description="Artifact-store key of the raw file copy.")
    train_uri: str
    train_sha256: str
    eval_uri: str
    eval_sha256: str
    shape: str
    total_rows: int
    bad_rows: int
    train_rows: int
    eval_rows: int
    token_stats: TokenStats
    report: dict[str, Any] = Field(default_factory=dict)
    distinct_rows: int | None = Field(None, description="Distinct rows of the dataset after rendering (None in older snapshots).")
    eval_source: str | None = Field(None, description="The eval_dataset file eval rows come from; None: held out of dataset.")
    eval_source_sha256: str | None = Field(None, description="sha256 of the raw eval_dataset file.")
    eval_source_uri: str | None = Field(None, description="Artifact-store key of the raw eval_dataset copy.")
    eval_excluded_rows: int = Field(0, description="eval_dataset rows left out because they also occur in dataset.")
    eval_in_train_rows: int = Field(0, description="Eval rows that also occur, exactly, in the train split (0 by construction).")
    eval_in_train_share: float = Field(0.0, description="eval_in_train_rows / eval_rows.")
    eval_prompt_in_train_rows: int = Field(
        0, description="Eval rows whose prompt occurs in the train split with another answer (near-duplicates)."
    )


class CheckpointRef(BaseModel):
    """Points at a committed checkpoint: its manifest is the truth."""

    manifest_key: str
    step: int
    manifest_sha256: str


class ChunkInput(BaseModel):
    run_id: str
    plan: TrainingPlan
    snapshot: DatasetSnapshot
    from_step: int = Field(0, description="The step the workflow last saw committed; losses are reported after it.")
    until_step: int = Field(description="Train up to (and including) this optimizer step, then checkpoint.")


class ChunkResult(BaseModel):
    checkpoint: CheckpointRef
    step: int
    loss: float = Field(description="Mean training loss over the steps of this chunk.")
    step_losses: list[float] = Field(default_factory=list, description="Loss of each step after from_step.")
    resumed_from_step: int
    seconds: float
    eval_loss: float | None = Field(
        None, description="Eval loss at the checkpoint over the run's checkpoint eval rows (the same first rows of "
        "the eval split at every checkpoint); None when the spec does not evaluate at checkpoints."
    )
    eval_tokens: int | None = Field(None, description="Labelled eval tokens eval_loss is the mean over.")
    eval_rows: int | None = Field(None, description="Eval rows eval_loss was measured on.")
    final_eval_loss: float | None = Field(
        None, description="Eval loss over the whole eval split, measured when the chunk reached the plan's last "
        "step (the tuned eval loss); None otherwise."
    )
    final_eval_tokens: int | None = Field(None, description="Labelled eval tokens final_eval_loss is the mean over.")


# What a chunk measured at its checkpoint: ChunkResult's fields, the recipe's ChunkOutcome's and
# the checkpoint manifest's meta keys alike.
CHUNK_EVAL_FIELDS = ("eval_loss", "eval_tokens", "eval_rows", "final_eval_loss", "final_eval_tokens")


class EvaluateInput(BaseModel):
    run_id: str
    plan: TrainingPlan
    snapshot: DatasetSnapshot
    checkpoint: CheckpointRef | None = Field(None, description="None evaluates the base model alone.")
    label: str = "baseline"
    eval_loss: float | None = Field(
        None, description="The checkpoint's eval loss as train_chunk measured it there: evaluate then only "
        "generates samples. None measures it."
    )
    eval_tokens: int | None = Field(None, description="Labelled eval tokens eval_loss is the mean over.")


class EvalSample(BaseModel):
    prompt: str
    reference: str
    generated: str


class EvalResult(BaseModel):
    label: str
    loss: float
    perplexity: float
    tokens: int
    samples: list[EvalSample] = Field(default_factory=list)


class PartialAdapter(BaseModel):
    """Why an adapter is published from a checkpoint of a run that did not finish."""

    step: int = Field(description="The checkpoint's optimizer step.")
    total_steps: int = Field(description="The steps the run planned.")
    run_state: str = Field(description="How the run ended: cancelled or failed.")
    reason: str | None = Field(None, description="Why it failed, when it did.")


class PublishInput(BaseModel):
    run_id: str
    plan: TrainingPlan
    snapshot: DatasetSnapshot
    checkpoint: CheckpointRef
    baseline: EvalResult | None = Field(None, description="None when the run never finished its baseline eval.")
    tuned: EvalResult | None = Field(None, description="None for a partial adapter: it was never evaluated.")
    partial: PartialAdapter | None = Field(None, description="Set when publishing a checkpoint of an unfinished run.")


class PublishCheckpointInput(BaseModel):
    """Input of the PublishCheckpoint workflow: publish a stopped run's newest checkpoint."""

    publish: PublishInput
    cpu_task_queue: str


class PublishResult(BaseModel):
    adapter_uri: str
    adapter_path: str | None = Field(None, description="Local directory of the adapter, when the store is local.")
    manifest_uri: str
    manifest_sha256: str


class RunCarry(BaseModel):
    """What a continued-as-new TuneLLM needs to pick up at the next chunk. Small by design:
    the loss history lives in the checkpoints, not here."""

    plan: TrainingPlan
    snapshot: DatasetSnapshot
    baseline: EvalResult
    step: int
    loss: float | None = None
    checkpoint: CheckpointRef | None = None
    seq: int
    pause_requested: bool = False


RunInput.model_rebuild()
