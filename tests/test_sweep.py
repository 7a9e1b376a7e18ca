"""`hubquant sweep` on a private local Ray: two tiny models x two variants, a rerun that skips
everything, and a failing task that does not stop the others, all with a stale Ray note and
RAY_ADDRESS pointing at a dead port (neither may be followed); an unreachable --address fails in one
line within the connect timeout. The sweep through a running cluster is in test_sweep_cluster.py."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
ray = pytest.importorskip("ray")


def free_port() -> int:
    """A port nothing uses on any address (bound, then released): Ray reaches 127.0.0.1:PORT in
    its GCS form at this machine's own address, where a Ray just stopped may still listen."""
    with socket.socket() as sock:
        sock.bind(("", 0))  # bound, never listening: nothing is exposed
        return sock.getsockname()[1]


@pytest.fixture
def stale_ray_note(monkeypatch):
    """Ray's temp dir in a fresh short folder (Ray's socket paths must stay short) holding the note
    an unstopped `ray start --head` leaves, pointing at a dead port, and RAY_ADDRESS pointing at
    another: what made `hubquant sweep` hang or refuse to start. The machine's own /tmp/ray and
    ~/.ray are neither read nor written."""
    base = tempfile.mkdtemp(prefix="hq-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    note = Path(base) / "ray" / "ray_current_cluster"
    note.parent.mkdir()
    note.write_text(f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_TMPDIR", base)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.delenv("HUBQUANT_RAY_CONNECT_TIMEOUT", raising=False)
    # Ray's default for a new local instance (token authentication, which ray.init turns on by
    # setting RAY_AUTH_MODE, undone at the end) with a token of its own: without one Ray writes
    # ~/.ray/auth_token, which turns authentication on for every later `ray start` on the machine.
    mode = os.environ.pop("RAY_AUTH_MODE", None)
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    yield note
    os.environ.pop("RAY_AUTH_MODE", None)
    if mode is not None:
        os.environ["RAY_AUTH_MODE"] = mode
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(base, ignore_errors=True)


def with_tokenizer(folder: Path, target: Path) -> Path:
    """A copy of a tiny checkpoint with a word-level tokenizer over its 160 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(folder, target)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 100)]
    words += "the of and to in is for that with on as are by it this be or from an at not if".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return target


def test_sweep_two_models_two_variants_rerun_and_failure(hf_checkpoint, tmp_path, stale_ray_note, capsys):
    from hubquant.evaluate.sweep import run_sweep

    a = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "models" / "tiny-llama")
    b = with_tokenizer(hf_checkpoint("gemma_mqa")[0], tmp_path / "models" / "tiny-gemma")
    broken = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "models" / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    spec = tmp_path / "sweep.yaml"
    settings = "{ctx: 16, max_chunks: 2, max_tokens: 200, speed: false, dtype: fp32, device: cpu}"
    spec.write_text(f"models: [{a}, {b}]\nvariants: [base, int8]\neval: {settings}\n")
    out = tmp_path / "out"
    summary = run_sweep(spec, out=out)  # a private Ray: neither the note nor RAY_ADDRESS is followed
    assert not summary["failed"] and len(summary["ran"]) == 4
    assert not ray.is_initialized()  # the sweep stopped the Ray it started
    assert stale_ray_note.read_text().startswith("127.0.0.1:")  # left as it was
    for name in ("tiny-llama", "tiny-gemma"):
        results = json.loads((out / name / "results.json").read_text())
        assert [r["variant"] for r in results["rows"]] == ["base", "int8"]
        assert results["rows"][1]["kld_mean"] is not None and (out / name / "report.html").is_file()
    assert (out / "report.html").is_file() and (out / "report.csv").is_file()

    again = run_sweep(spec, out=out)  # everything is there: nothing runs
    assert again["ran"] == [] and len(again["skipped"]) == 4

    spec.write_text(f"models: [{a}, {broken}]\nvariants: [base, int8, nf4]\neval: {settings}\n")
    mixed = run_sweep(spec, out=out)
    failed = {(f["model"], f["variant"]) for f in mixed["failed"]}
    assert failed == {(str(broken), v) for v in ("base", "int8", "nf4")}
    assert all("architecture 'NoSuchForCausalLM' is not supported" in f["error"] for f in mixed["failed"])
    assert all("\n" not in f["error"] for f in mixed["failed"])
    assert [list(t) for t in [(str(a), "nf4")]] == [t for t in mixed["ran"] if t[0] == str(a)]
    rows = json.loads((out / "tiny-llama" / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "int8", "nf4"]  # merged beside the earlier rows


def test_bad_sweep_files_are_one_line(tmp_path):
    from hubquant.errors import HubquantError
    from hubquant.evaluate.sweep import read_spec

    cases = {
        "models: []\n": "'models' must be a non-empty list",
        "models: [a]\nvariants: [int3]\n": "variant 'int3' is unknown",
        "models: [a]\neval: {ctxx: 3}\n": "eval setting 'ctxx' is unknown",
        "models: [a]\nfoo: 1\n": "unknown key 'foo'",
        "models: [a\n": "is not valid YAML",
    }
    for text, expected in cases.items():
        path = tmp_path / "s.yaml"
        path.write_text(text)
        with pytest.raises(HubquantError, match=expected):
            read_spec(path)


def test_address_forms():
    from hubquant.evaluate.sweep import _host_port

    assert _host_port("10.0.0.5:6379") == ("10.0.0.5:6379", "10.0.0.5", 6379)
    assert _host_port("head") == ("head:6379", "head", 6379)
    assert _host_port("ray://head") == ("ray://head:10001", "head", 10001)
    assert _host_port("ray://[::1]:10002") == ("ray://[::1]:10002", "::1", 10002)
    assert _host_port("auto") is None and _host_port("anyscale://x") is None
    from hubquant.errors import HubquantError

    with pytest.raises(HubquantError, match="is not HOST:PORT"):
        _host_port("head:port")


class _FlakyRay:
    """Ray's module as `_connect` uses it: `init` fails `failures` times with `error`, then joins."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures, self.error, self.calls, self.shutdowns = failures, error, 0, 0

    def init(self, address: str, log_to_driver: bool) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_transient_ray_client_init_failure_is_asked_again(monkeypatch):
    """Ray Client's proxy can fail to start a client's server once on a busy head (seen in a full
    suite run on 2 cores); the connect asks again within its time limit. Other errors are final."""
    from hubquant.errors import HubquantError
    from hubquant.evaluate.sweep import _connect

    monkeypatch.setenv("HUBQUANT_RAY_CONNECT_TIMEOUT", "30")
    flaky = _FlakyRay(1, ConnectionAbortedError("Initialization failure from server:\n"))
    _connect(flaky, "auto")
    assert (flaky.calls, flaky.shutdowns) == (2, 1)
    final = _FlakyRay(1, ConnectionError("something else"))
    with pytest.raises(HubquantError, match="something else"):
        _connect(final, "auto")
    assert final.calls == 1


def test_unreachable_address_is_one_line_within_the_timeout(tmp_path):
    """Through the CLI, in parallel: a dead port (refused at once) and a port that accepts but never
    answers (the watchdog, set to 4 s), each in Ray's GCS form and its ray:// form."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text("models: [./nothing]\nvariants: [base]\n")
    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port()))
    silent.listen(16)  # accepts connections (the kernel does), never says a word
    dead, mute = free_port(), silent.getsockname()[1]
    unset = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["HUBQUANT_RAY_CONNECT_TIMEOUT"] = "4"
    addresses = [
        f"127.0.0.1:{dead}",
        f"ray://127.0.0.1:{dead}",
        f"127.0.0.1:{mute}",
        f"ray://127.0.0.1:{mute}",
    ]
    runs = {}
    try:
        for address in addresses:
            command = [sys.executable, "-m", "hubquant", "sweep", str(spec), "--address", address]
            command += ["--out", str(tmp_path / "out")]
            runs[address] = (time.monotonic(), subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                                stderr=subprocess.PIPE, text=True))  # fmt: skip
        for address, (start, run) in runs.items():
            _, err = run.communicate(timeout=90)
            took = time.monotonic() - start
            errors = [line for line in err.splitlines() if line.startswith("hubquant: error:")]
            assert run.returncode == 1, err
            assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
            assert address in errors[0] and "--address" in errors[0], err
            if str(dead) in address:
                assert "cannot reach the Ray cluster" in errors[0] and err.count("\n") == 1, err
            else:
                assert "no answer from the Ray cluster" in errors[0] and "within 4 s" in errors[0], err
            assert took < 40, (address, took)
    finally:
        silent.close()
        for _, run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
