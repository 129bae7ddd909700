"""The same `lockn-tune up` run as a team service: metadata on PostgreSQL, artifacts on S3,
OIDC tokens with project roles. Real processes, real servers, all on loopback."""

from __future__ import annotations

import os
import subprocess

import httpx
import yaml

from activities.demo_data import write_demo_dataset
from cli.stack import settings_env
from tests.auth_tokens import LocalIssuer
from tests.stack_process import BIN, UpProcess


def test_team_stack_postgres_s3_and_auth(tmp_path, tiny_model, postgres, s3_server):
    home = tmp_path / "home"
    settings = s3_server.settings(home, database_url=postgres.new_database())
    with LocalIssuer() as issuer:
        auth = issuer.settings(home)
        env = {
            k: v for k, v in settings_env(settings).items()
            if k.startswith(("LOCKN_TUNE_S3_", "LOCKN_TUNE_ARTIFACT_STORE", "LOCKN_TUNE_DATABASE_URL"))
        }
        env |= {"LOCKN_TUNE_AUTH_ENABLED": "true", "LOCKN_TUNE_OIDC_ISSUER": auth.oidc_issuer,
                "LOCKN_TUNE_OIDC_AUDIENCE": auth.oidc_audience}
        up = UpProcess(home, env=env)
        up.start()
        try:
            data = write_demo_dataset(tmp_path / "data.jsonl", rows=120)
            spec = {
                "project": "team", "name": "team-run", "base_model": str(tiny_model), "dataset": str(data),
                "checkpoint_every_steps": 10,
                "hyperparameters": {"max_steps": 20, "learning_rate": 3e-3, "max_seq_len": 96, "micro_batch_size": 8,
                                    "grad_accum": 1},
            }
            spec_file = tmp_path / "spec.yaml"
            spec_file.write_text(yaml.safe_dump(spec))

            def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
                env = {k: v for k, v in os.environ.items() if k != "LOCKN_TUNE_API_TOKEN"}
                if token:
                    env["LOCKN_TUNE_API_TOKEN"] = token
                return subprocess.run([str(BIN), *args, "--api", up.url], capture_output=True, text=True, timeout=300,
                                      env=env)

            # No token: the CLI says what the API said, and exits 1.
            r = cli("runs", "list")
            assert r.returncode == 1 and "401" in r.stdout, r.stdout + r.stderr
            # A viewer cannot start a run.
            viewer = issuer.token(sub="vic", roles=["project:team:viewer"])
            r = cli("tune", str(spec_file), token=viewer)
            assert r.returncode == 1 and "403" in r.stdout and "operator" in r.stdout, r.stdout + r.stderr
            # An operator can, end to end: upload, train, publish to S3, metadata in PostgreSQL.
            operator = issuer.token(sub="olga", roles=["project:team:operator"])
            r = cli("tune", str(spec_file), token=operator)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "succeeded" in r.stdout and "tuned eval loss" in r.stdout
            run_id = r.stdout.split("run ")[1].split()[0]
            run = httpx.get(f"{up.url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {operator}"}).json()
            assert run["adapter_uri"].startswith(f"s3://{settings.s3_bucket}/") and run["adapter_path"] is None
            [artifact] = run["artifacts"]
            assert artifact["manifest"]["dataset"]["sha256"] == run["dataset_snapshot"]["sha256"]
            # Another project's operator does not see it at all.
            stranger = issuer.token(sub="sam", roles=["project:other:operator"])
            assert httpx.get(f"{up.url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {stranger}"}).status_code == 404
        finally:
            code = up.stop()
        out = up.proc.stdout.read()
    assert code == 0, out
    assert "auth:        OIDC tokens from " + auth.oidc_issuer in out
    assert "metadata:    postgresql" in out and "***" in out and postgres.password not in out
    assert f"artifacts:   s3://{settings.s3_bucket}" in out
