"""Activities of worker_cpu: run events, preflight, dataset snapshot, publish.

Sync activities on a thread pool: each is idempotent for its inputs, so a retry after a
crashed worker repeats it safely.
"""

from __future__ import annotations

from temporalio import activity

from activities.base_model import fetched_from_hub
from activities.errors import user_error
from activities.hub_fetch import fetch_base_model as fetch_from_hub
from activities.hub_fetch import stored_base_model, with_local_base_model
from activities.local_paths import allowed_roots
from activities.preflight import matrix_memory_refusal, preflight_report
from activities.publish import publish_adapter
from activities.snapshot import snapshot_dataset as make_snapshot
from schemas.activities import (
    DatasetSnapshot,
    FetchedModel,
    FetchModelInput,
    PublishInput,
    PublishResult,
    RecordEventInput,
    SnapshotInput,
    TrainingPlan,
)
from schemas.preflight import PreflightInput, PreflightReport
from schemas.settings import Settings
from store.artifacts import ArtifactStore
from store.blocking import BlockingDatabase
from store.tables import RunRow

# The run row's columns that a run's status and attachments write.
RUN_FIELDS = set(RunRow.model_fields) - {"id", "state"}
LARGE = {"plan", "dataset_snapshot", "metrics"}


def row_fields(inp: RecordEventInput) -> dict:
    """The run row's columns after an event: derived from the run's status (the same status
    the workflow's query answers and its search attributes come from), plus the attachments."""
    if inp.status is None:  # an event scheduled by a workflow worker older than status-carrying events
        return {k: v for k, v in inp.data.items() if k in RUN_FIELDS}
    fields = inp.status.model_dump(mode="json", include=RUN_FIELDS)
    return {**fields, **{k: v for k, v in inp.attach.items() if k in RUN_FIELDS}}


class CpuActivities:
    def __init__(self, settings: Settings, db: BlockingDatabase, store: ArtifactStore):
        self.settings, self.db, self.store = settings, db, store

    def roots(self) -> tuple:
        """Where specs may name local models and datasets; resolved on each use, since a
        root may be created (or be a symlink that changes) after the worker starts."""
        return allowed_roots(self.settings)

    @activity.defn(name="record_event")
    def record_event(self, inp: RecordEventInput) -> None:
        """Write a state transition to the run's events and row: the one writer of run state.
        Idempotent on (run_id, seq): a retry changes nothing."""
        data = {k: v for k, v in inp.data.items() if k not in LARGE}
        self.db.record_state(inp.run_id, inp.seq, inp.state, inp.message, data, **row_fields(inp))

    @activity.defn(name="preflight")
    def preflight(self, inp: PreflightInput) -> TrainingPlan:
        """Resolve model, data, config and hardware into a plan, or fail with what to change.
        The report is stored on the run either way."""
        base = stored_base_model(self.store, inp.base_model, self.settings.home) if inp.base_model else None
        report = preflight_report(inp.run_id, inp.spec, self.db, self.store, inp.hardware, roots=self.roots(), base=base)
        # Keyed: a retried preflight leaves one report and one row per warning.
        self.db.add_event(inp.run_id, "preflight", "preflight report", report.model_dump(mode="json"), key="preflight")
        if not report.ok:
            raise user_error(" ".join(report.errors))
        for i, w in enumerate(report.warnings):
            self.db.add_event(inp.run_id, "warning", w, key=f"preflight-warning:{i}")
        return report.plan

    @activity.defn(name="preflight_report")
    def preflight_report(self, inp: PreflightInput) -> PreflightReport:
        """The dry run: the same report, never raised as a failure for problems a user can fix."""
        return preflight_report(inp.run_id, inp.spec, self.db, self.store, inp.hardware, roots=self.roots())

    @activity.defn(name="snapshot_dataset")
    def snapshot_dataset(self, inp: SnapshotInput) -> DatasetSnapshot:
        """Copy, validate, split and tokenize the dataset. Resumes from nothing: rewrites the same keys."""
        plan = with_local_base_model(inp.plan, self.store, self.settings.home)  # the tokenizer's folder here
        return make_snapshot(plan, self.db, self.store, roots=self.roots())

    @activity.defn(name="fetch_base_model")
    def fetch_base_model(self, inp: FetchModelInput) -> FetchedModel | None:
        """Put a Hugging Face Hub model into the artifact store, once per commit. Resumes from
        the staging folder under home (complete files kept, a partial one continued by Range);
        an interrupted download fails the attempt as retryable (HubDownloadInterrupted).

        As a run's step (inp.spec set) it fetches only a Hub id: a local directory or a model in
        this worker's Hugging Face cache returns None, for preflight to resolve as before; and a
        model-matrix model that cannot fit the training worker is refused before any request."""
        if inp.spec is not None:
            if not fetched_from_hub(inp.repo_id, self.roots()):
                return None
            refusal = matrix_memory_refusal(inp.spec, inp.hardware)
            if refusal:
                raise user_error(refusal)
        return fetch_from_hub(inp, self.settings, self.db, self.store)

    @activity.defn(name="publish")
    def publish(self, inp: PublishInput) -> PublishResult:
        """Copy the final adapter to its versioned key with a lineage manifest."""
        return publish_adapter(inp, self.db, self.store)

    def all(self) -> list:
        return [self.record_event, self.preflight, self.preflight_report, self.snapshot_dataset, self.fetch_base_model, self.publish]
