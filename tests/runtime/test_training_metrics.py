"""Per-run training series: a chunk starting drops the series of runs no longer training in the
process, never those of a run training on another worker of the same process.

    python -m pytest tests/runtime/test_training_metrics.py -q
"""

from __future__ import annotations

from runtime import metrics


def runs_with_loss() -> set[str]:
    return {s.labels["run_id"] for m in metrics.TRAIN_LOSS.collect() for s in m.samples}


def test_a_chunk_keeps_the_series_of_runs_training_beside_it_and_drops_finished_ones():
    with metrics.training("run_old"):
        metrics.observe_step("run_old", 1.5, 0.1, 100)
    with metrics.training("run_a"):
        metrics.observe_step("run_a", 2.0, 0.1, 100)
        assert "run_old" not in runs_with_loss()  # finished before run_a started
        with metrics.training("run_b"):  # another worker of this process
            metrics.observe_step("run_b", 3.0, 0.1, 100)
            assert {"run_a", "run_b"} <= runs_with_loss()
        assert {"run_a", "run_b"} <= runs_with_loss()  # a finished run's series stay until a chunk starts
    with metrics.training("run_c"):
        assert runs_with_loss().isdisjoint({"run_old", "run_a", "run_b"})
