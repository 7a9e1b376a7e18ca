"""Outputs survive a full disk, `kill -9` mid-write and two runs at once; loads that cannot fit are
refused before they start.

- Full disk: `convert`, `quantize --out` and `eval`'s results.json are written by a child process
  under `RLIMIT_FSIZE` (a write past the limit fails with EFBIG, as on a full disk with ENOSPC):
  one error line naming OUT and the fix, no temporary folder or file left, the earlier OUT intact.
- `kill -9`: a child is paused mid-write (a shard closed inside the staging folder; results.json
  half written to its temporary file) and killed with SIGKILL; a second run is refused while it
  lives, naming its pid, and a rerun after it died completes, with no debris left.
- Memory: `HUBQUANT_AVAILABLE_MEMORY` stands in for the machine's free memory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hubquant.cli import main
from hubquant.convert import convert
from hubquant.convert.writer import clear_debris
from hubquant.errors import HubquantError
from hubquant.evaluate.results import read_results, write_results
from hubquant.locks import lock_path, out_lock
from hubquant.memory import ENV, cgroup_available, check_memory, human, meminfo_available

pytestmark = pytest.mark.filterwarnings("ignore")

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(150)]
EVAL_ARGS = ["--ctx", "32", "--max-tokens", "200", "--no-speed", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny(hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny sharded Llama with a word-level tokenizer.json, so that `eval` runs on it, and a
    text of its words beside it (`text.txt`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    source, _ = hf_checkpoint("llama_gqa")
    root = tmp_path_factory.mktemp("writes")
    folder = Path(shutil.copytree(source, root / "tiny"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(WORDS[3:]) for _ in range(400)))
    return folder


def eval_argv(tiny: Path, out: Path, variants: str = "base") -> list[str]:
    return ["eval", str(tiny), "--variants", variants, "--dataset", str(tiny.parent / "text.txt"),
            *EVAL_ARGS, "--out", str(out)]  # fmt: skip


def beside(out: Path) -> list[str]:
    """What a run writing `out` may leave beside it: OUT, `.OUT.tmp-*`, `.OUT.lock`..."""
    return sorted(
        p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.update(extra)
    return env


# A child that runs the CLI with its file-size limit lowered once the command's modules are imported
# (so that only the command's own writes meet the limit). Python ignores SIGXFSZ already; it is set
# again here so that a write past the limit raises EFBIG instead of killing the process.
LIMITED = """
import importlib, resource, signal, sys
from hubquant.cli import main
for module in sys.argv[2].split(","):
    importlib.import_module(module)
if sys.argv[3] == "quantize":
    from hubquant.quantize.registry import get_method
    get_method("int8")  # torchao
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[3:]))
"""
IMPORTS = {
    "convert": "hubquant.convert",
    "quantize": "hubquant.quantize.core,hubquant.models.loading",
    "eval": "hubquant.evaluate.run,hubquant.models.loading,hubquant.reports",
}


def run_limited(limit: int, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LIMITED, str(limit), IMPORTS[argv[0]], *argv],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("hubquant: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_full_disk_is_one_line_and_keeps_earlier_results(tiny: Path, tmp_path: Path) -> None:
    """convert, quantize --out and eval, each with a complete earlier OUT, re-run with --force under
    an 8 KB (results.json: 1 KB) file-size limit: one line naming OUT and the fix, nothing left
    beside OUT but OUT itself, and OUT byte for byte as it was."""
    converted = convert(tiny, tmp_path / "converted", max_shard_size="20KB", progress=False)
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "earlier.txt").write_text("an earlier, complete quantization\n")
    evaluated = tmp_path / "evaluated"
    write_results(evaluated / "results.json", {"schema_version": 1, "rows": [], "note": "earlier run"})
    before = {folder: snapshot(folder) for folder in (converted, quantized, evaluated)}

    # The three children run side by side: each pays for its imports once.
    children = {
        converted: run_limited(
            8_000, ["convert", str(tiny), "--out", str(converted), "--max-shard-size", "20KB", "--force"]
        ),  # fmt: skip
        quantized: run_limited(
            8_000, ["quantize", str(tiny), "--method", "int8", "--out", str(quantized), "--force"]
        ),  # fmt: skip
        evaluated: run_limited(1_000, [*eval_argv(tiny, evaluated), "--force"]),
    }
    for folder, child in children.items():
        out, err = child.communicate(timeout=120)
        assert child.returncode == 1, (folder.name, out, err)
        line = one_error_line(err)
        assert str(folder) in line and "File too large" in line, line
        assert "choose another --out" in line, line
        assert beside(folder) == [folder.name], (folder.name, beside(folder))  # no tmp, no lock
        assert snapshot(folder) == before[folder], folder.name
    print("\nfull disk: convert, quantize int8 and eval refused in one line each; earlier outputs intact")


PAUSE = """
import os, sys, time
from pathlib import Path
from hubquant.models import safetensors_file
from hubquant.convert import writer
marker = Path(os.environ["PAUSE_MARKER"])
what = os.environ["PAUSE_AT"]

def pause(note):
    marker.write_text(note)
    time.sleep(300)  # until killed

class Paused(safetensors_file.SafetensorsWriter):
    def close(self, check=True):
        super().close(check)
        pause(str(self.path))  # one shard complete inside the staging folder

if what == "shard":
    safetensors_file.SafetensorsWriter = writer.SafetensorsWriter = Paused
else:  # results.json half written to its temporary file, once a row is in
    import json
    real_fsync = os.fsync
    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name.startswith(".results.json.") and json.loads(path.read_text()).get("rows"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            pause(str(path))
        return real_fsync(fd)
    os.fsync = fsync
from hubquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_paused(argv: list[str], at: str, marker: Path) -> tuple[subprocess.Popen, str]:
    """Start the CLI in a child that pauses mid-write; returns it and the file it paused on."""
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSE, *argv],
        env=child_env(PAUSE_MARKER=str(marker), PAUSE_AT=at),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the child ended before pausing ({child.returncode}):\n{out}\n{err}")
        assert time.monotonic() < deadline, "the child never reached its pause"
        time.sleep(0.02)
    time.sleep(0.05)  # the marker's text is written
    return child, marker.read_text()


def kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_convert_killed_mid_write_blocks_a_second_run_then_leaves_no_trace(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    child, shard = start_paused(
        ["convert", str(tiny), "--out", str(out), "--max-shard-size", "20KB"], "shard", tmp_path / "paused"
    )
    try:
        staging = Path(shard).parent
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-"), shard
        assert lock_path(out).read_text().strip() == str(child.pid)
        # A second run meanwhile: refused at once, in one line naming the first.
        assert main(["convert", str(tiny), "--out", str(out), "--force"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"another hubquant run (pid {child.pid}) is writing {out}" in line, line
        assert "wait for it to finish or pick another --out" in line
    finally:
        kill(child)
    # kill -9: the staging folder and the (stale: flock died with its holder) lock file stay.
    assert staging.is_dir() and lock_path(out).is_file() and not out.exists()
    assert beside(out) == sorted([lock_path(out).name, staging.name])

    assert convert(tiny, out, max_shard_size="20KB", progress=False) == out
    assert beside(out) == ["out"]  # debris removed, lock released
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard_name in index["weight_map"].items():
        with safe_open(out / shard_name, "pt") as f, safe_open(tiny / source[name], "pt") as g:
            assert torch.equal(f.get_tensor(name), g.get_tensor(name).to(torch.bfloat16)), name


def test_eval_killed_mid_results_write_is_resumed(tiny: Path, tmp_path: Path, capsys) -> None:
    """Killed while results.json's temporary file is half written (the base row measured): the
    earlier results.json is whole, a second eval meanwhile is refused, and the rerun trusts
    nothing half-written: it removes the temporary file, resumes after base and completes."""
    out = tmp_path / "eval"
    child, tmp = start_paused(eval_argv(tiny, out, "base,int8"), "results", tmp_path / "paused")
    try:
        assert Path(tmp).parent == out and Path(tmp).name.startswith(".results.json."), tmp
        with pytest.raises(
            HubquantError, match=rf"another hubquant run \(pid {child.pid}\) is writing {out};"
        ):
            from hubquant.evaluate.run import run_eval

            run_eval(
                str(tiny), variants=["base"], dataset=str(tiny.parent / "text.txt"), out=out, device="cpu"
            )
    finally:
        kill(child)
    with pytest.raises(json.JSONDecodeError):
        json.loads(Path(tmp).read_text())  # really half written
    earlier = read_results(out / "results.json")
    assert earlier["rows"] == []  # the header written before base was measured: whole

    assert main(eval_argv(tiny, out, "base,int8")) == 0
    printed = capsys.readouterr().out
    assert "base       already in" not in printed  # base was not saved before the kill: redone
    results = read_results(out / "results.json")
    assert [row["variant"] for row in results["rows"]] == ["base", "int8"]
    assert not Path(tmp).exists() and not lock_path(out).exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "report.html").is_file() and (out / "variants" / "int8" / "config.json").is_file()

    # Once more: everything is done, so nothing is redone, and no trace is left either.
    assert main(eval_argv(tiny, out, "base,int8")) == 0
    printed = capsys.readouterr().out
    assert "base       already in" in printed and "int8       already in" in printed
    assert beside(out) == ["eval"]


def test_unreadable_results_json_is_set_aside_not_trusted(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"schema_version": 1, "rows": [{"variant": "base", "ppl"')
    assert main(eval_argv(tiny, out)) == 0
    assert "could not be read" in capsys.readouterr().out
    assert [row["variant"] for row in read_results(out / "results.json")["rows"]] == ["base"]
    assert (out / "results.json.unreadable").read_text().endswith('"ppl"')


def test_clear_debris_restores_an_out_swapped_aside_by_a_killed_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tmp_path / ".out.old-1234abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / ".out.tmp-xyz").mkdir()
    (tmp_path / ".out.del-99").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()  # another OUT's: not ours to touch
    clear_debris(out)
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "out"]
    # With OUT in place, a stale `.old-*` is a replaced folder: removed.
    old.mkdir()
    clear_debris(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "out"]


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999999\n")  # a dead run's: stale, never blocks
    with out_lock(out) as path:
        assert path.read_text() == f"{os.getpid()}\n"
        code = textwrap.dedent(f"""
            from hubquant.locks import out_lock
            from hubquant.errors import HubquantError
            try:
                with out_lock({str(out)!r}):
                    print("taken")
            except HubquantError as error:
                print(error)
        """)
        result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.stdout.strip() == (
            f"another hubquant run (pid {os.getpid()}) is writing {out}; wait for it to finish or pick another --out"
        ), result.stderr
    assert not path.exists()
    with out_lock(out):  # free again
        pass


# --- memory ----------------------------------------------------------------------------------


def needed_to_load(folder: Path, dtype: torch.dtype) -> int:
    """The bytes `load` needs, from the safetensors library's own reading of the headers."""
    total = largest = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                numel = 1
                for n in t.get_shape():
                    numel *= n
                stored = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}[t.get_dtype()]
                total += numel * dtype.itemsize
                largest = max(largest, numel * stored)
    return total + largest


def test_load_is_refused_with_the_figures_when_memory_is_short(tiny: Path, monkeypatch, capsys) -> None:
    import hubquant

    needed = needed_to_load(tiny, torch.float32)
    monkeypatch.setenv(ENV, str(needed - 1))
    with pytest.raises(HubquantError) as error:
        hubquant.load(tiny, dtype="fp32", progress=False)
    message = str(error.value)
    assert message == (
        f"loading {tiny} in float32 on cpu needs {human(needed)}, {human(needed - 1)} available RAM "
        f"({ENV}): use --dtype bf16, a quantized variant (hubquant quantize --out), or a machine with more memory"
    )
    monkeypatch.setenv(ENV, str(needed))  # exactly enough
    model, _ = hubquant.load(tiny, dtype="fp32", progress=False)
    assert next(model.parameters()).dtype == torch.float32

    monkeypatch.setenv(ENV, "1KB")
    assert main(["generate", str(tiny), "--dtype", "bf16", "--device", "cpu"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "in bfloat16 on cpu needs" in line and "1.0 kB available RAM" in line
    assert "--dtype bf16" not in line and "a quantized variant" in line  # bf16 already


def test_quantize_checkpoint_is_refused_before_writing(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    from hubquant.quantize.core import quantize_checkpoint

    # Streaming holds one group at a time: a layer, or everything outside the layers.
    groups: dict[str | None, int] = {}
    for shard in tiny.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                layer = re.match(r"model\.layers\.(\d+)\.", name)
                key = layer.group(1) if layer else None
                groups[key] = groups.get(key, 0) + f.get_tensor(name).numel() * 4  # in fp32
    needed = 2 * max(groups.values())
    out = tmp_path / "q"
    monkeypatch.setenv(ENV, str(needed - 1))
    with pytest.raises(
        HubquantError,
        match=r"quantizing .* needs .*: free memory, or use --dtype bf16 or a machine with more memory$",
    ):
        quantize_checkpoint(tiny, out, "int8", dtype="fp32", progress=False)
    assert beside(out) == []
    monkeypatch.setenv(ENV, str(needed))
    quantize_checkpoint(tiny, out, "int8", dtype="fp32", progress=False)
    assert (out / "config.json").is_file() and beside(out) == ["q"]


def test_memory_figures_come_from_meminfo_and_the_cgroup(tmp_path: Path, monkeypatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683656 kB\nMemFree:  100 kB\nMemAvailable:    7900000 kB\n")
    assert meminfo_available(meminfo) == 7_900_000 * 1024
    assert meminfo_available(tmp_path / "none") is None

    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (v2 / "memory.max").write_text("max\n")
    (v2 / "job" / "memory.max").write_text(f"{8 * 10**9}\n")
    (v2 / "job" / "memory.current").write_text(f"{5 * 10**9}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon 1\nfile {2 * 10**9}\n")
    assert cgroup_available(v2, proc) == 5 * 10**9  # limit - (usage - page cache)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_available(v1, proc) is None  # v1's "no limit"
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{4 * 10**9}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{3 * 10**9}\n")
    (v1 / "memory" / "memory.stat").write_text(f"cache 5\ntotal_cache {10**9}\n")
    assert cgroup_available(v1, proc) == 2 * 10**9

    monkeypatch.setenv(ENV, "7.9GB")
    with pytest.raises(HubquantError) as error:
        check_memory(
            16_100_000_000, "cpu", what="loading big/model in float32 on cpu", fix="use --dtype bf16"
        )
    assert str(error.value) == (
        f"loading big/model in float32 on cpu needs 16.1 GB, 7.9 GB available RAM ({ENV}): use --dtype bf16"
    )
    check_memory(7_900_000_000, "cpu", what="x", fix="y")  # fits exactly
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(HubquantError, match=re.escape(f"{ENV}='lots' is not a size")):
        check_memory(1, "cpu", what="x", fix="y")
