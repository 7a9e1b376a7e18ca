"""Both of bitsandbytes' CPU paths for nf4, whichever CPU the suite lands on.

The suite itself runs the path of this CPU. Where that is the AVX512-BF16 kernel, the nf4 tests run
once more in a child process with the detection turned off (bnb_cpu_path.py), so that the path of
CPUs without AVX512-BF16 (dequantize, then a plain linear: bit-exact checks) is held to its
checks here too. A CPU without AVX512-BF16 cannot execute the other kernel: there the test says so
and skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bnb_cpu_path import ENV
from conftest import packed_nf4_kernel

pytest.importorskip("bitsandbytes")

TESTS = Path(__file__).parent
NF4_TESTS = ["test_quantize_nf4.py", "test_fused.py", "test_quantize_bert.py"]


@pytest.mark.skipif(os.environ.get(ENV) == "0", reason="already the path without AVX512-BF16")
def test_nf4_tests_pass_on_the_path_without_avx512bf16(tmp_path):
    if not packed_nf4_kernel():
        pytest.skip("this CPU has no AVX512-BF16: the suite ran the only nf4 path it can execute")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "nf4",
         "--basetemp", str(tmp_path / "pytest"), *(str(TESTS / t) for t in NF4_TESTS)],
        env={**os.environ, ENV: "0"}, capture_output=True, text=True, timeout=600, cwd=TESTS.parent,
    )  # fmt: skip
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail


def test_the_switch_turns_the_kernel_off():
    """The child process above really runs the other path (else it would test nothing new)."""
    code = (
        "import bnb_cpu_path, bitsandbytes, bitsandbytes.nn.modules as m\n"
        "assert not bitsandbytes.functional.has_avx512bf16()\n"
        "assert not m.Linear4bit(64, 64).support_avx512bf16_for_cpu\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, ENV: "0", "PYTHONPATH": str(TESTS)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
