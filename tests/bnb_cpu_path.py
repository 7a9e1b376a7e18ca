"""Choose which of bitsandbytes' two CPU code paths for 4-bit weights a test process runs.

bitsandbytes 0.50 asks its native library once, at import, whether the CPU has AVX512-BF16
(`bitsandbytes.functional.has_avx512bf16`). With it, an eval-mode `Linear4bit` repacks its weight
on the first call and runs a fused bf16 kernel whose block scales are rounded to bf16; without it,
the weight is dequantized and a plain linear runs. A suite that only ran the path of the CPU it
happens to land on would test that CPU, so a process started with
`HUBQUANT_TEST_BNB_AVX512BF16=0` runs the path without AVX512-BF16 on any CPU: this file,
executed before bitsandbytes is imported (conftest.py does; subprocess scripts prepend its text),
makes the detection answer False. The other direction cannot be forced: a CPU without the
instructions cannot execute that kernel.

This file imports nothing from the project so that its text can run in any process.
"""

import importlib.abc
import importlib.machinery
import os
import sys

ENV = "HUBQUANT_TEST_BNB_AVX512BF16"


class _WithoutAvx512Bf16(importlib.abc.MetaPathFinder):
    """Patches `bitsandbytes.functional.has_avx512bf16` as the module finishes executing, before
    bitsandbytes' CPU backend and `nn.modules` import the name."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(ENV) == "0" and not any(isinstance(f, _WithoutAvx512Bf16) for f in sys.meta_path):
    if "bitsandbytes" in sys.modules:
        raise RuntimeError(f"{ENV}=0 must take effect before bitsandbytes is imported")
    sys.meta_path.insert(0, _WithoutAvx512Bf16())
