#!/usr/bin/env bash
# The GPU check of hubquant in one command, from the project root on the GPU machine:
#
#   bash tests/gpu/run.sh [LAYERS]        (LAYERS of the 8B-shaped checkpoint, default 32)
#
# Steps, in priority order, each time-boxed with `timeout`, all of them within GPU_BUDGET_S seconds
# (default 540; a step gets its own cap or what is left, whichever is less, and is skipped when
# under 15 s are left):
#   a. install what the GPU image lacks (torchao, bitsandbytes, gguf, lm-eval: wheels carried in
#      .gpu/whl, git-ignored) and this project, into /tmp/site, without dependencies; versions
#   b. tiny parity on CUDA (tests/gpu/tiny.py)                                      cap  90 s
#   c. a random checkpoint with Apertus-8B's shapes in /tmp/ap8b, unless there      cap 120 s
#      (tests/gpu/make8b.py, tokenizer from .gpu/tok)
#   d. the GPU bench on it (tests/bench_gpu.py)                                     cap 240 s
#   e. hubquant eval of it: base, int4, int8, nf4 on CUDA                           cap 300 s
# Everything goes to ${OUT:-/tmp/gpu-out} as it is learnt: log.txt (this output), one full log per
# step (STEP.log), tiny.json, gpu-bench.json, results.json. Knobs: OUT, GPU_BUDGET_S, BENCH_VARIANTS
# (the bench's --variants, default base,int4,int8,fp8,nf4).
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/tests/gpu
OUT=${OUT:-/tmp/gpu-out}
LAYERS=${1:-32}
BUDGET=${GPU_BUDGET_S:-540}
BENCH_VARIANTS=${BENCH_VARIANTS:-base,int4,int8,fp8,nf4}
CKPT=/tmp/ap8b
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HUBQUANT_CACHE=/tmp/hqcache TRANSFORMERS_VERBOSITY=error
# our evaluate/ folder must never shadow Hugging Face's `evaluate` (lm-eval imports it)
export PYTHONSAFEPATH=1
exec > >(tee -a "$OUT/log.txt") 2>&1

t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0))s] $*"; }

# secs CAP: the seconds the next step may take (its cap, or what is left of the budget less a
# margin); fails when too little is left.
secs() {
    local left=$((BUDGET - ($(date +%s) - t0) - 5))
    ((left < 15)) && return 1
    ((left < $1)) && echo "$left" || echo "$1"
}

# Lines of library chatter left out of log.txt (each step's own log keeps them all).
NOISE='Warning|warn\(|warnings\.warn|Failed to load|_pytree\.py|register_constant|xIELU|XIELU|it/s\]|s/it\]|^Loading weights|^Writing model|^\s*$'

# step NAME SECONDS CMD...: run CMD under timeout; full output to $OUT/NAME.log, the rest here.
step() {
    local name=$1 limit=$2
    shift 2
    say "$name: start (timeout ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tr '\r' '\n' | grep -v -E "$NOISE"
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        say "$name: TIMED OUT after ${limit}s"
    else
        say "$name: exit $rc"
    fi
    return "$rc"
}

skip() { say "$1: skipped, under 15 s of the ${BUDGET}s budget left"; }

say "GPU check: OUT=$OUT LAYERS=$LAYERS budget ${BUDGET}s, project $ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
echo "cpus $(nproc); python $(python3 -c 'import sys; print(sys.version.split()[0])'); disk /tmp: $(df -h /tmp | awk 'NR==2 {print $4}') free"

# a. install ------------------------------------------------------------------------------------
say "install: start"
rm -rf /tmp/site
if compgen -G "$ROOT/.gpu/whl/*.whl" >/dev/null; then
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site "$ROOT"/.gpu/whl/*.whl >>"$OUT/install.log" 2>&1 || say "install: WARNING: the carried wheels did not all install (install.log)"
else
    say "install: WARNING: no wheels in $ROOT/.gpu/whl (torchao, bitsandbytes, gguf, lm-eval)"
fi
if ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --target /tmp/site "$ROOT" >>"$OUT/install.log" 2>&1; then
    # no wheel-building setuptools there: lay the package out by hand, as setup.py maps its folders
    say "install: pip could not build the project (install.log); copying its folders into /tmp/site instead"
    python3 - "$ROOT" <<'PY' || { say "install: FAILED to install the project; stopping"; exit 1; }
import shutil, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
from setup import FOLDERS
for name, folder in FOLDERS.items():
    shutil.copytree(root / folder, Path("/tmp/site", *name.split(".")), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
PY
fi
export PYTHONPATH=/tmp/site
python3 - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "accelerate", "torchao", "bitsandbytes", "gguf", "lm_eval", "hubquant"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
try:
    import torch

    import hubquant
    print(f"  cuda {torch.version.cuda}, available {torch.cuda.is_available()}; hubquant from {hubquant.__file__}")
except Exception as error:
    print(f"  IMPORT FAILED: {type(error).__name__}: {error}")
PY
say "install: done"
cd /tmp || exit 1

# b. tiny parity ---------------------------------------------------------------------------------
rm -rf /tmp/tiny
if t=$(secs 90); then
    step tiny "$t" python3 "$HERE/tiny.py" /tmp/tiny --budget $((t - 25))
    cp /tmp/tiny/tiny.json "$OUT/" 2>/dev/null
else skip tiny; fi

# c. the 8B-shaped checkpoint (kept when it is there with the layers asked for) --------------------
if grep -q "\"num_hidden_layers\": $LAYERS," "$CKPT/config.json" 2>/dev/null; then
    say "make8b: $CKPT is there with $LAYERS layers; kept"
elif t=$(secs 120); then
    rm -rf "$CKPT" /tmp/eval8b # the eval's rows belong to the old checkpoint
    step make8b "$t" python3 "$HERE/make8b.py" "$CKPT" "$ROOT/.gpu/tok" "$LAYERS"
else skip make8b; fi

if [ -f "$CKPT/config.json" ]; then
    # d. bench -----------------------------------------------------------------------------------
    rm -rf /tmp/bench-gpu-work
    if t=$(secs 240); then
        step bench "$t" python3 "$ROOT/tests/bench_gpu.py" "$CKPT" --variants "$BENCH_VARIANTS" \
            --out "$OUT/gpu-bench.json" --work /tmp/bench-gpu-work --budget $((t - 30))
    else skip bench; fi
    rm -rf /tmp/bench-gpu-work

    # e. eval (a rerun on the same checkpoint resumes: finished variants are kept in results.json) -
    if t=$(secs 300); then
        step eval "$t" python3 -m hubquant eval "$CKPT" --variants base,int4,int8,nf4 --max-chunks 4 \
            --device cuda --out /tmp/eval8b
        cp /tmp/eval8b/results.json "$OUT/" 2>/dev/null || say "eval: no results.json"
    else skip eval; fi
else
    say "no checkpoint at $CKPT: bench and eval skipped"
fi

say "done; files in $OUT:"
ls -la "$OUT"
sleep 1 # let tee flush
