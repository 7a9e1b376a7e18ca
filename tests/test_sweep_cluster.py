"""`hubquant sweep --address` through a running Ray cluster, in each form the README gives: the GCS
address (`HEAD:PORT`, from a machine of the cluster) and Ray Client (`ray://HEAD:CLIENTPORT`).

The cluster is one `ray start --head --block` on this machine (1 CPU, its own temp dir and ports),
with Ray's token authentication on and a token of its own (RAY_AUTH_TOKEN: ~/.ray is neither read
nor written), started in a session of its own and stopped by killing that session's processes:
never `ray stop`, which stops every Ray on the machine. Each sweep runs the `hubquant` command in a
process of its own, as a user would, with RAY_ADDRESS pointing elsewhere (--address wins)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
ray = pytest.importorskip("ray")
pytest.importorskip("grpc", reason="ray:// needs ray[client]")

from test_sweep import free_port, with_tokenizer  # noqa: E402


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (the head's `ray start` and everything it started)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                zombie = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
                if os.getsid(int(name)) == sid and not zombie:
                    pids.append(int(name))
            except (OSError, IndexError):
                pass
    return pids


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def ray_env(token: str) -> dict[str, str]:
    """This environment, with Ray's token authentication on and `token` as the token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_head():
    """(GCS port, Ray Client port, token) of a one-CPU Ray head on this machine, stopped at the
    end."""
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="hq-head-", dir="/tmp" if os.path.isdir("/tmp") else None)
    gcs, client = free_port(), free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.is_file() else shutil.which("ray") or "ray", "start", "--head"]
    command += ["--block", f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=1"]
    command += ["--num-gpus=0", "--include-dashboard=false", f"--dashboard-port={free_port()}"]
    command += [f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}/ray"]
    command += ["--disable-usage-stats"]
    env = ray_env(token)
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 (closed at the end)
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (listening(gcs) and listening(client)):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"ray start --head did not come up: {(Path(temp) / 'head.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield gcs, client, token
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            pids = session_pids(head.pid)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            end = time.monotonic() + wait
            while head.poll() is None or session_pids(head.pid):  # poll() reaps the leader
                if time.monotonic() > end:
                    break
                time.sleep(0.2)
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_through_a_cluster_in_each_address_form(hf_checkpoint, tmp_path, ray_head):
    gcs, client, token = ray_head
    model = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "models" / "tiny-llama")
    settings = "{ctx: 16, max_chunks: 2, max_tokens: 200, speed: false, dtype: fp32, device: cpu}"
    spec = tmp_path / "sweep.yaml"
    out = tmp_path / "out"
    env = {**ray_env(token), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}  # --address wins over it

    def sweep(address: str) -> dict:
        command = [sys.executable, "-m", "hubquant", "sweep", str(spec), "--address", address]
        # What is tested is each address form, not how fast a Ray client connects: on two busy
        # cores the default 30 s was once not enough for the ray:// form in a full suite run.
        slow = {**env, "HUBQUANT_RAY_CONNECT_TIMEOUT": "120"}
        run = subprocess.run(
            command + ["--out", str(out)], env=slow, capture_output=True, text=True, timeout=240
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        return json.loads((out / "sweep.json").read_text())

    spec.write_text(f"models: [{model}]\nvariants: [base]\neval: {settings}\n")
    # Meanwhile, without the token, each form is refused in one line that says what to set.
    tokenless = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = {}
    for address in (f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}"):
        command = [sys.executable, "-m", "hubquant", "sweep", str(spec), "--address", address]
        command += ["--out", str(tmp_path / "refused")]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused[address] = subprocess.Popen(command, env=tokenless, **pipes)
    first = sweep(f"127.0.0.1:{gcs}")  # the GCS form, from a machine of the cluster
    assert not first["failed"] and first["ran"] == [[str(model), "base"]]

    spec.write_text(f"models: [{model}]\nvariants: [base, int8]\neval: {settings}\n")
    second = sweep(f"ray://127.0.0.1:{client}")  # Ray Client
    assert not second["failed"] and second["ran"] == [[str(model), "int8"]]
    assert second["skipped"] == [[str(model), "base"]]

    for address, run in refused.items():
        try:
            _, err = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 1, err
        last = err.rstrip().splitlines()[-1]
        assert last.startswith(f"hubquant: error: the Ray cluster at {address} uses token authentication")
        assert "RAY_AUTH_MODE=token" in last and "RAY_AUTH_TOKEN" in last

    rows = json.loads((out / "tiny-llama" / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "int8"] and rows[1]["kld_mean"] is not None
    assert (out / "report.html").is_file()
