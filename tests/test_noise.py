"""Only hubquant's line shows: library warnings and log lines go to `--debug`, errors name the culprit.

Each CLI run is a fresh interpreter (`hubquant ...` as a user runs it), so what libraries print when
they are imported is seen too. tqdm progress bars are hubquant's output and stay; everything else
on stderr without `--debug` is chatter, and there must be none.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from fakehub import FakeHub

import hubquant.cli as cli
from hubquant.cli import _LIBRARY_VERBOSITY, main
from hubquant.errors import HubquantError

# A tqdm bar as it is printed: "desc: 42%|████  | 3/7 [00:01<00:02, 1.5it/s]", or without a total
# "desc: 0tensor [00:00, ?tensor/s]"; HF downloads: "model.safetensors: 100%|...| 12.3k/12.3k [...]".
PROGRESS = re.compile(
    r"^(?:.*: )?(?:\s*\d{1,3}%\|[^|]*\| *\S+/\S+|\s*[\d.]+[kMGTP]?[A-Za-z]*)"
    r" \[\d+:\d+(?::\d+)?(?:<[^,\]]*)?, [^\]]*\]$"
)


def chatter(stderr: str) -> list[str]:
    """stderr's lines that are not tqdm progress (bars redraw with \\r and clear to spaces)."""
    lines = (part.strip() for line in stderr.split("\n") for part in line.split("\r"))
    return [line for line in lines if line and not PROGRESS.match(line)]


def test_progress_pattern_tells_bars_from_chatter():
    bars = [
        "quantize int8:   0%|          | 0/3 [00:00<?, ?it/s]",
        "quantize int8: 100%|██████████| 3/3 [00:00<00:00, 110.75it/s]",
        "loading: 0tensor [00:00, ?tensor/s]",
        "Fetching 5 files: 100%|██████████| 5/5 [00:00<00:00, 79.20it/s]",
        "model-00001-of-00004.safetensors: 100%|##########| 12.3k/12.3k [00:00<00:00, 1.20MB/s]",
    ]
    noise = [
        "W1122 06:42:51.757000 21032 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum",
        "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
        "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x",
        "Retrying in 1s [Retry 1/5].",
        "hubquant: error: something",
    ]
    assert chatter("\r".join(bars) + "\n" + " " * 40 + "\r\n") == []
    assert chatter("\n".join(noise)) == noise


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(home: Path, endpoint: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "PYTHONSAFEPATH": "1",
    }
    # What the user has not set: the libraries' own verbosity knobs (conftest sets one) and token.
    for name in (*_LIBRARY_VERBOSITY, "PYTHONWARNINGS", "HF_TOKEN", "HF_DEBUG"):
        env.pop(name, None)
    return env


def start_cli(args: list[str], home: Path, endpoint: str = "", before: str = "") -> subprocess.Popen:
    """`hubquant ARGS` in a fresh interpreter, started; `before` runs first (to make a command
    noisy). No endpoint: one that refuses connections, so nothing reaches a real Hub."""
    code = "import sys\nfrom hubquant import cli\n" + textwrap.dedent(before)
    code += "\nsys.exit(cli.main(sys.argv[1:]))\n"
    env = cli_env(home, endpoint or f"http://127.0.0.1:{free_port()}")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(args: list[str], home: Path, endpoint: str = "", before: str = "") -> subprocess.CompletedProcess:
    return finish(start_cli(args, home, endpoint, before))


@pytest.fixture(scope="module")
def tiny(hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny sharded Llama with a word-level tokenizer, so that it generates text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder, _ = hf_checkpoint("llama_gqa")
    repo = Path(shutil.copytree(folder, tmp_path_factory.mktemp("noise") / "tiny"))
    words = ["<pad>", "<s>", "</s>", "hello", "world", "the", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(repo / "tokenizer.json"))
    (repo / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True})
    )
    return repo


GENERATE = ["--prompt", "hello world", "--max-new-tokens", "3", "--dtype", "fp32", "--device", "cpu"]


def test_unreachable_hub_is_one_line_naming_the_endpoint(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # refuses connections
    result = run_cli(["generate", "org/does-not-exist"], tmp_path / "home", endpoint)
    lines = chatter(result.stderr)
    print(f"unreachable Hub: exit {result.returncode}, stderr lines {lines}")
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hubquant: error: "), result.stderr
    line = lines[0]
    assert f"cannot reach the Hub at {endpoint} to fetch org/does-not-exist" in line, line
    assert "refused" in line and "check the network" in line and "HF_HUB_OFFLINE=1" in line, line


def test_client_closed_under_a_parallel_download_names_the_network():
    """huggingface_hub closes its shared HTTP client when a request fails to connect; a parallel
    download still using it fails with "the client has been closed", which names no culprit."""
    from huggingface_hub.utils import close_session, get_session

    from hubquant.models.hub import _hub_errors

    client = get_session()
    close_session()
    with pytest.raises(HubquantError) as info, _hub_errors("org/tiny", None):
        client.get("http://127.0.0.1:9/never-sent")
    message = str(info.value)
    assert message.startswith("cannot reach the Hub at ") and "org/tiny" in message, message
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message, message


def test_quantize_prints_no_library_chatter(tiny, tmp_path):
    """torchao, imported by the int8 method, logs "Failed to load ..._C_cutlass_90a.abi3.so" and
    makes torch log `_pytree` deprecations on a CPU-only machine: none of it shows."""
    out = tmp_path / "int8"
    result = run_cli(["quantize", str(tiny), "--method", "int8", "--out", str(out)], tmp_path / "home")
    lines = chatter(result.stderr)
    print(f"quantize int8: exit {result.returncode}, {len(lines)} lines of chatter")
    assert result.returncode == 0, result.stderr
    assert lines == [], result.stderr
    assert f"wrote {out}" in result.stdout and (out / "config.json").is_file()


def test_nf4_asks_no_hub_for_a_kernel(tiny, tmp_path):
    """bitsandbytes, imported on a CPU with AVX512-BF16, asks the `kernels` package for a CPU kernel
    from the Hub (a request, and a warning when it fails). hubquant imports it without: no request,
    no line, the kernel bitsandbytes ships. (Without AVX512-BF16 bitsandbytes never asks.)"""
    out = tmp_path / "nf4"
    watch = "import atexit\natexit.register(lambda: print('kernels imported:', 'kernels' in sys.modules))\n"
    result = run_cli(
        ["quantize", str(tiny), "--method", "nf4", "--out", str(out)], tmp_path / "home", before=watch
    )
    assert result.returncode == 0, result.stderr
    assert chatter(result.stderr) == [], result.stderr
    assert "kernels imported: False" in result.stdout, result.stdout
    assert (out / "config.json").is_file()


# Make `generate` noisy the way libraries are: each logs through its own logger (huggingface_hub
# and torch with the handlers they install on import), and python warnings.
NOISY = """
import logging
import warnings

real = cli._cmd_generate

def noisy(args):
    import huggingface_hub, torch  # noqa: F401  (both install their log handlers on import)

    logging.getLogger("huggingface_hub.utils._http").warning(
        "'[Errno -2] Name or service not known' thrown while requesting HEAD https://hub/x"
    )
    logging.getLogger("torch.utils._pytree").warning("KernelPreference is an Enum subclass")
    logging.getLogger("torchao").warning("Failed to load _C_fake.so")
    logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")
    logging.getLogger("lm_eval.evaluator").warning("lm-eval says hello")
    warnings.warn("a library UserWarning")
    logging.getLogger("hubquant.models.note").warning("HUBQUANT NOTE")  # hubquant's own: shows
    real(args)

cli._cmd_generate = noisy
"""
INJECTED = [
    "thrown while requesting HEAD",
    "KernelPreference is an Enum subclass",
    "Failed to load _C_fake.so",
    "Retrying after connection broken",
    "lm-eval says hello",
    "a library UserWarning",
]


def test_generate_shows_hubquant_lines_only_and_debug_shows_the_libraries(tiny, tmp_path):
    """Without --debug: a download from the (fake) Hub and a generation print their progress bars,
    the text and hubquant's own note, nothing else. With --debug the libraries' lines show."""
    hub = FakeHub()
    hub.repos = {"org/tiny": tiny}
    try:  # the two runs side by side: each is mostly interpreter start-up
        quiet = start_cli(["generate", "org/tiny", *GENERATE], tmp_path / "home", hub.url, before=NOISY)
        debug = start_cli(["--debug", "generate", str(tiny), *GENERATE], tmp_path / "home2", before=NOISY)
        quiet, debug = finish(quiet), finish(debug)
    finally:
        hub.close()
    lines = chatter(quiet.stderr)
    print(f"generate from the Hub: exit {quiet.returncode}, stderr lines {lines}")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("hello world"), quiet.stdout
    assert lines == ["HUBQUANT NOTE"], quiet.stderr
    assert "Fetching" in quiet.stderr and hub.fetched("org/tiny"), quiet.stderr  # HF's bars stay

    shown = [text for text in INJECTED if text in debug.stderr]
    print(f"generate --debug: exit {debug.returncode}, {len(shown)}/{len(INJECTED)} library lines shown")
    assert debug.returncode == 0, debug.stderr
    assert shown == INJECTED and "HUBQUANT NOTE" in debug.stderr, debug.stderr
    assert debug.stdout == quiet.stdout


def test_main_in_process_restores_logging_warnings_and_environment(tiny, capsys, monkeypatch):
    names = ["", "hubquant", "huggingface_hub", "transformers", "torch", "torchao", "lm_eval"]
    levels = {name: logging.getLogger(name).level for name in names}
    env = {name: os.environ.get(name) for name in _LIBRARY_VERBOSITY}
    filters = list(warnings.filters)
    seen: dict[str, object] = {}

    def inside() -> None:  # while the command runs: libraries hushed, hubquant not
        seen["torchao"] = logging.getLogger("torchao").isEnabledFor(logging.CRITICAL)
        seen["hubquant"] = logging.getLogger("hubquant.x").isEnabledFor(logging.WARNING)
        seen["env"] = os.environ.get("HF_HUB_VERBOSITY")

    real = cli._cmd_generate

    def wrapped(args) -> None:
        inside()
        real(args)

    monkeypatch.setattr(cli, "_cmd_generate", wrapped)
    assert main(["generate", str(tiny), *GENERATE]) == 0
    assert capsys.readouterr().out.startswith("hello world")
    assert seen["torchao"] is False and seen["hubquant"] is True, seen
    assert seen["env"] == (env["HF_HUB_VERBOSITY"] or "critical"), seen
    assert {name: logging.getLogger(name).level for name in names} == levels
    assert {name: os.environ.get(name) for name in _LIBRARY_VERBOSITY} == env
    assert list(warnings.filters) == filters
