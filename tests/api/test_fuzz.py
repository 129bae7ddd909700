"""Property-based fuzzing of the OpenAPI schema against a running `lockn-tune up` (real
HTTP, real Temporal, real workers): no request, however odd, gets a 5xx, and every answer
is one the schema documents, with the documented shape and content type.

Two passes: one with generated path ids (mostly "not found"), and one with the ids of a
real finished run, its dataset and artifact, a consent and a publish target, so the
fuzzed bodies and queries reach the code behind the lookups."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from activities.demo_data import write_demo_dataset
from tests.stack_process import UpProcess

ST = Path(sys.executable).parent / "st"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis(url: str, cwd: Path, examples: int, config: Path | None = None) -> tuple[int, str]:
    cmd = [str(ST)]
    if config:
        cmd += ["--config-file", str(config)]
    cmd += [
        "run", f"{url}/openapi.json", "--checks", CHECKS, "--phases", "coverage,fuzzing",
        "--max-examples", str(examples), "--seed", "20261124",
        # One worker: hypothesis describes filters by parsing lambdas with `ast`, which is not
        # thread-safe on CPython 3.11 ("AST constructor recursion depth mismatch").
        "--workers", "1",
        # {model_id:path} takes any string, which hypothesis builds by filtering.
        "--suppress-health-check", "filter_too_much", "--no-color",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, check=False)
    return result.returncode, result.stdout + result.stderr


def not_found_operations(report: str) -> list[str]:
    """Operations schemathesis says kept answering 404 (so fuzzing never got past the lookup)."""
    found = re.search(r"Missing test data: (\d+) operations? repeatedly returned 404[^\n]*\n((?:.*\n){0,40})", report)
    if not found:
        return []
    listed = re.findall(r"^\s*- ([A-Z]+ /\S+)", found.group(2), re.M)[: int(found.group(1))]
    assert len(listed) == int(found.group(1)), f"could not read the operations from: {found.group(0)}"
    return listed


def real_objects(url: str, tiny_model: Path, tmp: Path) -> dict[str, str]:
    """A finished run with its dataset and adapter, a consent and a publish target in project 'fuzz'."""
    with httpx.Client(base_url=url, timeout=60) as http:
        data = write_demo_dataset(tmp / "data.jsonl", rows=60)
        ds = http.post("/v1/datasets", params={"project": "fuzz"}, files={"file": data.open("rb")}).json()
        spec = {"project": "fuzz", "base_model": str(tiny_model), "dataset": ds["id"],
                "hyperparameters": {"max_steps": 4, "max_seq_len": 96, "micro_batch_size": 4, "grad_accum": 1}}
        run = http.post("/v1/runs", json=spec).json()
        deadline = time.monotonic() + 240
        while (state := http.get(f"/v1/runs/{run['id']}").json())["state"] != "succeeded":
            assert state["state"] not in ("failed", "cancelled") and time.monotonic() < deadline, state
            time.sleep(0.5)
        [artifact] = http.get(f"/v1/runs/{run['id']}/artifacts").json()
        consent = http.post("/v1/projects/fuzz/consents",
                            json={"speaker": "Fay", "statement": "Fay agrees to a voice model for fuzzing."}).json()
        target = http.post("/v1/projects/fuzz/publish-targets", json={"name": "local", "kind": "directory"}).json()
    return {"run_id": run["id"], "dataset_id": ds["id"], "artifact_id": artifact["id"], "project": "fuzz",
            "consent_id": consent["id"], "target_id": target["id"], "model_id": "Qwen/Qwen3-0.6B"}


def test_openapi_fuzz_finds_no_server_errors(tmp_path, tiny_model):
    stack = UpProcess(tmp_path / "home")
    stack.start()
    try:
        schema = httpx.get(f"{stack.url}/openapi.json").json()
        operations = sum(len(ops) for ops in schema["paths"].values())
        code, report = schemathesis(stack.url, tmp_path, examples=25)
        assert code == 0, report[-6000:]
        tested = int(report.split("Tested:", 1)[1].split()[0])
        assert tested == operations, f"{tested} of {operations} operations fuzzed"

        ids = real_objects(stack.url, tiny_model, tmp_path)
        config = tmp_path / "schemathesis.toml"
        config.write_text("[parameters]\n" + "".join(f'"path.{k}" = "{v}"\n' for k, v in ids.items()))
        code, report = schemathesis(stack.url, tmp_path, examples=10, config=config)
        assert code == 0, report[-6000:]
        # With real ids, only the DELETEs run out of data: their first calls removed the target
        # and the dataset (its run has finished, so nothing holds it).
        assert set(not_found_operations(report)) <= {
            "DELETE /v1/projects/{project}/publish-targets/{target_id}", "DELETE /v1/datasets/{dataset_id}"
        }, report[-3000:]
    finally:
        stack.stop()
