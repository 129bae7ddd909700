"""One stack per home: `lockn-tune up` after its supervisor was killed, a second `up` on a
live home, `lockn-tune down`, and how the CLI finds a stack. Real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx

from activities.demo_data import write_demo_dataset
from cli.stack import port_in_use
from tests.stack_process import BIN, UpProcess, free_port, stack_processes, wait_run

ONE_STACK = {"temporal": 1, "api": 1, "worker_cpu": 1, "worker_gpu": 1}


def counts(home) -> dict[str, int]:
    return {name: len(found) for name, found in stack_processes(home).items()}


def gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: no --api, whatever the environment says."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCKN_TUNE_")}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})


def test_up_after_the_supervisor_was_killed_ends_with_one_stack(tmp_path, tiny_model):
    home = tmp_path / "home"
    up = UpProcess(home, env={"LOCKN_TUNE_HEARTBEAT_EVERY_S": "1"})
    up.start()
    try:
        data = write_demo_dataset(tmp_path / "data.jsonl", rows=120)
        spec = {
            "project": "restart", "name": "orphaned", "base_model": str(tiny_model), "dataset": str(data),
            "checkpoint_every_steps": 20,
            "hyperparameters": {"max_steps": 100, "learning_rate": 3e-3, "max_seq_len": 96, "micro_batch_size": 8, "grad_accum": 1},
        }
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(json.dumps(spec))  # JSON is YAML
        r = up.cli("tune", str(spec_file), "--no-follow")  # uploads the dataset, as a user's run does
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = r.stdout.split("run ")[-1].split()[0]
        wait_run(up.url, run_id, lambda run: run["state"] == "training" and run["step"] >= 5)
        orphans = stack_processes(home)
        up.proc.kill()  # kill -9: the children live on, training
        up.proc.wait()
        assert counts(home) == ONE_STACK

        # The same command again takes the home over: the orphans stop cleanly, one stack starts.
        again = UpProcess(home, env=up.env, same_ports_as=up)
        again.start()
        try:
            assert all(gone(pid) for pids in orphans.values() for pid in pids)
            assert counts(home) == ONE_STACK
            recorded = json.loads((home / "pids.json").read_text())
            assert recorded["supervisor"]["pid"] == again.proc.pid
            assert {n: e["pid"] for n, e in recorded["services"].items()} == {n: p[0] for n, p in stack_processes(home).items()}
            done = wait_run(again.url, run_id, lambda run: run["state"] in ("succeeded", "failed", "cancelled"), timeout=400)
            assert done["state"] == "succeeded", done.get("error")
            assert done["step"] == 100
            assert counts(home) == ONE_STACK
        finally:
            again.proc.kill()  # and once more, now with nothing running: `down` cleans up
            again.proc.wait()
        out = again.proc.stdout.read()
        assert "its supervisor (pid" in out and "is gone" in out, out

        r = cli("down", "--home", str(home), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "worker_gpu" in r.stdout and "temporal" in r.stdout and "stopped" in r.stdout
        assert stack_processes(home) == {}
        assert not (home / "pids.json").exists() and not (home / "stack.json").exists()
    finally:
        if stack_processes(home):  # whatever failed, leave nothing running
            cli("down", "--home", str(home), timeout=300)


def test_second_up_is_refused_cli_finds_the_stack_and_down_stops_it(tmp_path):
    home = tmp_path / "home"
    up = UpProcess(home)
    up.start()
    try:
        before = stack_processes(home)
        # The advice of old ("choose other ports") taken: other ports, same home.
        second = UpProcess(home)
        proc = subprocess.Popen(second.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=second.env)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=200)
            raise AssertionError(f"a second stack started on {home}:\n{out}") from None
        assert proc.returncode == 1, out
        assert str(home) in out and f"pid {up.proc.pid}" in out and f"lockn-tune down --home {home}" in out, out
        assert all(str(pid) in out for pids in before.values() for pid in pids), out
        assert stack_processes(home) == before and up.proc.poll() is None
        assert httpx.get(f"{up.url}/healthz", timeout=10).status_code == 200

        # The CLI finds the stack on its non-default ports through the home, with no --api.
        listed = cli("runs", "list", env={"LOCKN_TUNE_HOME": str(home)})
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "project" in listed.stdout

        r = cli("down", "--home", str(home), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"pid {up.proc.pid}" in r.stdout and "worker_gpu" in r.stdout and "stopped" in r.stdout, r.stdout
        assert up.proc.wait(30) == 0
    finally:
        if up.proc.poll() is None:
            up.stop()
    assert stack_processes(home) == {}
    assert not (home / "pids.json").exists() and not (home / "stack.json").exists()
    nothing = cli("down", "--home", str(home))
    assert nothing.returncode == 0 and "no stack is running" in nothing.stdout, nothing.stdout + nothing.stderr


def test_a_stop_right_after_start_up_leaves_nothing_running(tmp_path):
    """SIGTERM as soon as the stack is up (before the supervisor is done printing its banner),
    with nobody reading its output any more: the services still stop, nothing is orphaned."""
    home = tmp_path / "home"
    up = UpProcess(home)
    up.start()
    up.proc.stdout.close()
    up.proc.send_signal(signal.SIGTERM)
    up.proc.wait(200)
    assert stack_processes(home) == {}
    assert not (home / "pids.json").exists() and not (home / "stack.json").exists()


def test_cli_with_no_api_says_where_it_looked_and_how_to_start(tmp_path):
    """Nothing listens: one or two lines naming the address and its source, exit 1."""
    home, port = tmp_path / "home", free_port()
    cases = [
        ({"LOCKN_TUNE_HOME": str(home), "LOCKN_TUNE_API_PORT": str(port)}, [], f"http://127.0.0.1:{port}", "LOCKN_TUNE_API_PORT"),
        ({"LOCKN_TUNE_HOME": str(home)}, ["--api", f"http://127.0.0.1:{port}"], f"http://127.0.0.1:{port}", "--api"),
    ]
    if not port_in_use("127.0.0.1", 8420):  # someone's real stack may hold the default port
        cases.append(({"LOCKN_TUNE_HOME": str(home)}, [], "http://127.0.0.1:8420", "default"))
    # A home whose stack was killed leaves its address behind: it is tried, and named.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "stack.json").write_text(json.dumps({"api_url": f"http://127.0.0.1:{port}", "pid": 2**22 + 1}))
    cases.append(({"LOCKN_TUNE_HOME": str(stale)}, [], f"http://127.0.0.1:{port}", str(stale / "stack.json")))
    started = time.monotonic()
    for env, extra, address, source in cases:
        r = cli("runs", "list", *extra, env=env, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        assert "Traceback" not in out and "ConnectError" not in out, out
        assert len(out.strip().splitlines()) <= 2, out
        assert address in out and source in out and "lockn-tune up --home" in out, out
    # Every kind of command, not only listing: submitting, following, cancelling.
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base_model: {tmp_path / 'model'}\ndataset: ds_0123456789abcdef\n")
    for args in (["tune", str(spec)], ["preflight", str(spec)], ["runs", "follow", "run_x"], ["runs", "cancel", "run_x"]):
        r = cli(*args, env={"LOCKN_TUNE_HOME": str(home), "LOCKN_TUNE_API_PORT": str(port)}, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "Traceback" not in out and len(out.strip().splitlines()) <= 2, out
        assert f"http://127.0.0.1:{port}" in out and "LOCKN_TUNE_API_PORT" in out, out
    assert time.monotonic() - started < 60


def test_a_recycled_pid_in_pids_json_is_never_signalled(tmp_path):
    """pids.json names a process by pid, command line and start time: a pid now held by some
    other program is left alone, while a service the dead supervisor really left is stopped."""
    import sys

    from cli.stack import Recorded

    home = tmp_path / "home"
    home.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.3)
        real = Recorded.of("worker_cpu", leftover.pid, stop_timeout=5).as_json()
        # The stranger got a pid that pids.json once gave to worker_gpu, a process long gone.
        recycled = {**Recorded.of("worker_gpu", stranger.pid).as_json(), "cmdline": [sys.executable, "-m", "worker_gpu.main"]}
        dead_supervisor = {"pid": 2**22 + 1, "cmdline": ["lockn-tune", "up"], "started": 1}
        (home / "pids.json").write_text(json.dumps(
            {"supervisor": dead_supervisor, "services": {"worker_gpu": recycled, "worker_cpu": real}}
        ))
        r = cli("down", "--home", str(home), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"worker_cpu pid {leftover.pid} stopped" in r.stdout, r.stdout
        assert str(stranger.pid) not in r.stdout
        assert leftover.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None  # untouched
        assert not (home / "pids.json").exists()
    finally:
        for proc in (stranger, leftover):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_services_pids_json_does_not_name_are_found_in_the_home_and_stopped(tmp_path):
    """A supervisor killed while it rewrote pids.json, or one of an older format, leaves
    services pids.json does not name: they are found by their working directory (the home)
    and command line, and stopped; the same program elsewhere is left alone."""
    import sys

    home = tmp_path / "home"
    home.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "worker_gpu.main"]
    unnamed = subprocess.Popen(argv, cwd=home)
    stranger = subprocess.Popen(argv, cwd=elsewhere)
    try:
        time.sleep(0.3)
        dead_supervisor = {"pid": 2**22 + 1, "cmdline": ["lockn-tune", "up"], "started": 1}
        (home / "pids.json").write_text(json.dumps({"supervisor": dead_supervisor, "services": {}}))
        r = cli("down", "--home", str(home), timeout=200)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "pids.json does not name" in r.stdout and f"worker_gpu pid {unnamed.pid} stopped" in r.stdout, r.stdout
        assert unnamed.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None and str(stranger.pid) not in r.stdout
    finally:
        for proc in (unnamed, stranger):
            proc.kill()
            proc.wait()
