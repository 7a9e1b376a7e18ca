"""`hubquant --help` and argument errors answer without importing torch; the lazy names still work.

Each check runs in a fresh interpreter: in this process torch is long imported. How fast the
answer comes is a benchmark's business, not a test's; these tests check the cause (no torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def test_help_version_and_argument_errors_do_not_import_torch():
    result = run_python(
        """
        import contextlib, io, sys

        import hubquant
        from hubquant import HubquantError, __version__
        from hubquant.cli import build_parser, main

        build_parser()
        cases = [
            (["--help"], 0),
            (["generate", "--help"], 0),
            (["--version"], 0),
            (["generate"], 2),  # SOURCE missing
            (["convert", "x", "--out", "o", "--dtype", "fp64"], 2),
            (["frobnicate"], 2),
            (["quantize", "--help"], 0),
            (["push", "--help"], 0),
            (["quantize", "m", "--method", "int3"], 2),
            (["quantize", "m"], 2),  # --method missing
            (["push", "folder"], 2),  # --repo-id missing
        ]
        for argv, status in cases:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(argv)
                except SystemExit as exit:
                    assert exit.code == status, (argv, exit.code, err.getvalue())
                else:
                    raise AssertionError(f"{argv} did not exit")
            if argv == ["--version"]:
                assert out.getvalue().strip() == f"hubquant {__version__}", out.getvalue()
            if status == 2:
                assert "hubquant" in err.getvalue() and "error:" in err.getvalue(), err.getvalue()
        heavy = sorted(m for m in ("torch", "numpy", "safetensors", "huggingface_hub") if m in sys.modules)
        assert not heavy, f"imported for --help: {heavy}"
        assert issubclass(HubquantError, Exception)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_lazy_names_resolve_to_the_functions_and_classes():
    result = run_python(
        """
        import sys
        import types

        import hubquant
        assert "torch" not in sys.modules
        assert set(hubquant.__all__) <= set(dir(hubquant))
        from hubquant import Decoder, HubquantError, KVCache, ModelConfig, Tokenizer, generate, load
        assert "torch" in sys.modules  # now it is needed, and imported
        assert callable(hubquant.load) and hubquant.load is load
        assert isinstance(generate, types.FunctionType) and generate.__name__ == "generate"
        assert hubquant.models.load is load  # subpackages are reachable as attributes

        # A submodule import must not hide the function of the same name.
        import hubquant.models.generate
        import hubquant.evaluate.perplexity
        from hubquant.models import generate as models_generate
        from hubquant.evaluate import perplexity
        assert isinstance(models_generate, types.FunctionType), models_generate
        assert isinstance(perplexity, types.FunctionType), perplexity
        assert sys.modules["hubquant.models.generate"].generate is models_generate

        import hubquant.models as models
        for name in models.__all__:
            assert not isinstance(getattr(models, name), types.ModuleType), name
        try:
            hubquant.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise AssertionError("hubquant.no_such_name resolved")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_console_script_help():
    script = Path(sys.executable).with_name("hubquant")
    if not script.is_file():
        pytest.skip("hubquant is not installed as a console script beside this interpreter")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hubquant") and "generate" in result.stdout
