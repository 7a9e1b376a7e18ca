"""The wheel is whole and works where it is installed (`make wheel-check`; CI runs it as its own step).

1. Build the wheel from the tree (`pip wheel`, build dependencies from the lock).
2. Its files are exactly hubquant's: every module and every template under the package folders
   (setup.py's FOLDERS), under `hubquant/`; nothing else at the top level (no `evaluate`, no `tests`).
3. Install it into a fresh virtual environment, dependencies from the lock, and there, away from
   the source tree: `hubquant --help`, `hubquant convert` of a tiny Llama written with safetensors,
   and `hubquant.load` of the result, whose logits must be finite and equal across two loads.

Exit 0 when every step holds; a failing step prints what it ran and its output.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
TORCH = os.environ.get("TORCH", "2.13.0")

TINY = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file

out = Path(sys.argv[1]); out.mkdir()
hidden, inter, layers, heads, kv, vocab = 32, 64, 2, 4, 2, 96
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
    "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
    "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}
(out / "config.json").write_text(json.dumps(config))
g = torch.Generator().manual_seed(0)
def r(*shape):
    return torch.randn(*shape, generator=g) * 0.05
d = hidden // heads
t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": 1 + r(hidden),
     "lm_head.weight": r(vocab, hidden)}
for i in range(layers):
    p = f"model.layers.{i}."
    t.update({
        p + "input_layernorm.weight": 1 + r(hidden), p + "post_attention_layernorm.weight": 1 + r(hidden),
        p + "self_attn.q_proj.weight": r(heads * d, hidden), p + "self_attn.k_proj.weight": r(kv * d, hidden),
        p + "self_attn.v_proj.weight": r(kv * d, hidden), p + "self_attn.o_proj.weight": r(hidden, heads * d),
        p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
        p + "mlp.down_proj.weight": r(hidden, inter),
    })
save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
"""

LOAD = r"""
import sys
import torch
import hubquant

assert hubquant.__file__.startswith(sys.prefix), f"hubquant imported from {hubquant.__file__}"
ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
logits = []
for _ in range(2):
    model, _ = hubquant.load(sys.argv[1], progress=False)
    with torch.no_grad():
        logits.append(model(ids).float())
assert logits[0].shape == (1, 6, 96) and torch.isfinite(logits[0]).all()
assert torch.equal(logits[0], logits[1])
print("loaded", type(model).__name__, tuple(logits[0].shape))
"""


def step(title: str, args: list[str], **kwargs: object) -> str:
    start = time.monotonic()
    run = subprocess.run(args, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if run.returncode != 0:
        print(
            f"wheel check: FAILED at {title}: {' '.join(map(str, args))}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
        )
        sys.exit(1)
    print(f"wheel check: {title} ({time.monotonic() - start:.0f} s)")
    return run.stdout


def expected_files() -> set[str]:
    """Every module and template under the package folders, by its path inside the wheel."""
    spec = importlib.util.spec_from_file_location("hubquant_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # not __main__: only FOLDERS and packages() are read
    files = set()
    for package, folder in setup.FOLDERS.items():
        base = package.replace(".", "/")
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder)
            if not path.is_file() or "__pycache__" in rel.parts:
                continue
            if path.suffix == ".py" or "templates" in rel.parts[:-1]:
                files.add(f"{base}/{rel.as_posix()}")
    return files


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="hubquant-wheel-"))
    env = {**os.environ, "PIP_CONSTRAINT": str(LOCK), "PYTHONSAFEPATH": "1"}
    step(
        "build",
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
        env=env,
    )
    (wheel,) = (work / "dist").glob("hubquant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    extra_top = {t for t in top if t != "hubquant" and not t.endswith(".dist-info")}
    if extra_top:
        sys.exit(f"wheel check: FAILED: {wheel.name} installs {sorted(extra_top)} at the top level")
    missing = expected_files() - names
    if missing:
        sys.exit(f"wheel check: FAILED: {wheel.name} lacks {sorted(missing)}")
    print(
        f"wheel check: {wheel.name} holds all {len(expected_files())} modules and templates, only under hubquant/"
    )

    venv = work / "venv"
    step("fresh environment", [sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    step(
        "install the wheel from the lock",
        [py, "-m", "pip", "install", "-q", "-c", str(LOCK), f"torch=={TORCH}", str(wheel)],
        env=env,
    )
    cli = str(venv / "bin" / "hubquant")
    run = work / "run"
    run.mkdir()
    usage = step("hubquant --help", [cli, "--help"], cwd=run, env=env)
    if "convert" not in usage or "eval" not in usage:
        sys.exit(f"wheel check: FAILED: hubquant --help does not list its commands:\n{usage}")
    step("a tiny Llama", [py, "-c", TINY, str(run / "tiny")], cwd=run, env=env)
    step(
        "hubquant convert",
        [cli, "convert", str(run / "tiny"), "--out", str(run / "converted"), "--dtype", "fp32"],
        cwd=run,
        env=env,
    )
    print(
        "wheel check: "
        + step("hubquant.load", [py, "-c", LOAD, str(run / "converted")], cwd=run, env=env).strip()
    )
    shutil.rmtree(work)
    print(f"wheel check: passed ({wheel.name})")


if __name__ == "__main__":
    main()
