"""`hubquant sweep SWEEP.yaml`: many models x variants, one Ray task each, one report at the end.

    models: [HuggingFaceTB/SmolLM2-135M, ./my-folder]
    variants: [base, int4, int8]
    dataset: python-docs
    eval: {ctx: 512, max_chunks: 32, dtype: bf16}     # any `hubquant eval` setting
    out: results/sweep                                 # optional; --out wins

Each (model, variant) is one Ray task running the very code of `hubquant eval` for that variant
(`run_eval(variants=[variant])`) in a folder of its own (OUT/<model>/tasks/<variant>/). A task asks
Ray for what its variant needs (a GPU when the eval runs on one; one CPU otherwise; memory: the
checkpoint's bytes twice), so Ray packs tasks onto the cluster's machines. As tasks finish, the
driver (one process: no two writers) merges their rows into OUT/<model>/results.json, exactly
where `hubquant eval --out OUT/<model>` writes, with its report. A rerun skips every (model,
variant) already there with the same settings, as `hubquant eval` does; a failed task is reported
with its one-line error and the others go on. At the end every model's results are merged into one
side-by-side report (`hubquant report`): OUT/report.html and OUT/report.csv.

Without `--address`, Ray starts on this machine (`ray.init()`), so the command works anywhere.
Ray is an optional extra: `pip install hubquant[scale]`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError

SPEC_KEYS = ("models", "variants", "dataset", "eval", "out")
# `run_eval` settings a sweep file may give under `eval:` (everything but where and what).
_NOT_SETTINGS = {"model_source", "variants", "dataset", "out", "force", "progress", "revision"}


def _eval_settings() -> set[str]:
    from .run import run_eval

    return set(inspect.signature(run_eval).parameters) - _NOT_SETTINGS


def read_spec(path: str | Path) -> dict[str, Any]:
    """The sweep file, checked: one-line errors that name the key and the fix."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HubquantError(f"sweep file {path} not found") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise HubquantError(f"{path} is not valid YAML{at}; fix the file") from None
    if not isinstance(spec, dict):
        raise HubquantError(f"{path} must be a mapping with 'models' and 'variants'")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise HubquantError(f"{path}: unknown key '{unknown[0]}'; the keys are {', '.join(SPEC_KEYS)}")
    models = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise HubquantError(f"{path}: 'models' must be a non-empty list of Hub ids or folders")
    if len(set(models)) != len(models):
        raise HubquantError(f"{path}: 'models' names a model twice; name each once")
    variants = spec.get("variants", ["base", "int4", "nf4", "int8"])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, str) for v in variants):
        raise HubquantError(f"{path}: 'variants' must be a non-empty list such as [base, int4, int8]")
    from .run import _check_variants

    _check_variants(variants)
    settings = spec.get("eval") or {}
    if not isinstance(settings, dict):
        raise HubquantError(f"{path}: 'eval' must be a mapping of `hubquant eval` settings")
    bad = sorted(set(settings) - _eval_settings())
    if bad:
        raise HubquantError(
            f"{path}: eval setting '{bad[0]}' is unknown; use any of {', '.join(sorted(_eval_settings()))}"
        )
    dataset = spec.get("dataset", "python-docs")
    if not isinstance(dataset, str):
        raise HubquantError(f"{path}: 'dataset' must be python-docs, wikitext2 or a .txt path")
    return {
        "models": models,
        "variants": variants,
        "dataset": dataset,
        "eval": settings,
        "out": spec.get("out"),
    }


def model_folder_name(model: str) -> str:
    """The results folder name of a model, as `hubquant eval` names it."""
    path = Path(model)
    name = path.name if path.is_dir() else model
    return name.strip("/").replace("/", "__")


def _task(model: str, variant: str, dataset: str, settings: dict[str, Any], out: str) -> dict[str, Any]:
    """One (model, variant): `hubquant eval`'s code in its own folder; never raises (a failure comes
    back as its one-line error)."""
    from .run import run_eval

    try:
        results = run_eval(model, variants=[variant], dataset=dataset, out=out, progress=False, **settings)
        return {"ok": True, "results": results}
    except HubquantError as error:
        return {"ok": False, "error": str(error)}
    except Exception as error:  # one line, as the CLI prints it
        first = str(error).splitlines()[0] if str(error) else ""
        return {"ok": False, "error": f"{type(error).__name__}: {first}"}


def _resources(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What a task asks Ray for: a GPU when its eval runs on one, else a CPU; memory: twice the
    checkpoint's bytes when they are known here (a local folder)."""
    device = str(settings.get("device", "auto"))
    wants_gpu = device.startswith("cuda") or device == "auto" and _cuda_available()
    options: dict[str, Any] = {"num_gpus": 1} if wants_gpu else {"num_cpus": 1}
    folder = Path(model)
    if folder.is_dir():
        nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if nbytes:
            options["memory"] = 2 * nbytes
    return options


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _merge(model_out: Path, task_results: list[dict[str, Any]], variants: list[str]) -> dict[str, Any] | None:
    """Rows of the finished tasks (and of earlier runs) into OUT/<model>/results.json, in the sweep's
    variant order, with the verdict and the reports, written atomically by this one process."""
    from .results import Row, read_results, rows_of, save_results, verdict
    from .run import _write_reports

    path = model_out / "results.json"
    rows: dict[str, Row] = {}
    header: dict[str, Any] | None = None
    if path.is_file():
        old = read_results(path)
        header = {k: v for k, v in old.items() if k not in ("rows", "verdict", "created")}
        rows.update({r.variant: r for r in rows_of(old)})
        if not all(_same_settings(old, results) for results in task_results):
            raise HubquantError(
                f"{path} holds results made with other settings; remove it or pick another --out"
            )
    for results in task_results:
        if header is None:
            header = {k: v for k, v in results.items() if k not in ("rows", "verdict", "created")}
        rows.update({r.variant: r for r in rows_of(results)})
    if header is None:
        return None
    ordered = [rows[v] for v in variants if v in rows] + [r for v, r in rows.items() if v not in variants]
    budget = header.get("budget", {})
    if "min_cosine" in budget:
        judged = verdict(ordered, min_cosine=budget["min_cosine"])
    else:
        judged = verdict(ordered, budget.get("max_kld", 0.05), budget.get("min_top1", 0.9))
    merged = save_results(path, header, ordered, judged)
    _write_reports(merged, model_out)
    return merged


def _same_settings(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(old.get(key) == new.get(key) for key in ("model", "dataset", "method", "budget"))


def run_sweep(
    spec_path: str | Path, *, address: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Run a sweep file (see the module docstring); returns its summary (also OUT/sweep.json).

    Args:
        spec_path: the YAML file.
        address: a Ray cluster ("ray://host:10001" or "auto"); None: Ray on this machine.
        out: the results folder (default: the file's `out`, else results/sweep).
    """
    spec = read_spec(spec_path)
    root = Path(out or spec["out"] or "results/sweep").expanduser().absolute()
    todo: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for model in spec["models"]:
        path = root / model_folder_name(model) / "results.json"
        done = set()
        if path.is_file():
            from .results import read_results

            done = {r["variant"] for r in read_results(path).get("rows", [])}
        for variant in spec["variants"]:
            (skipped if variant in done else todo).append((model, variant))
    for model, variant in skipped:
        print(f"{model} {variant}: already in {root / model_folder_name(model) / 'results.json'}; skipped")
    failures: list[dict[str, str]] = []
    finished: dict[str, list[dict[str, Any]]] = {}
    if todo:
        ray = _ray(address)
        remote = ray.remote(_task)
        pending = {}
        for model, variant in todo:
            task_out = root / model_folder_name(model) / "tasks" / variant
            options = _resources(model, spec["eval"])
            ref = remote.options(**options).remote(
                model, variant, spec["dataset"], spec["eval"], str(task_out)
            )
            pending[ref] = (model, variant)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            model, variant = pending.pop(ready[0])
            answer = ray.get(ready[0])
            if answer["ok"]:
                finished.setdefault(model, []).append(answer["results"])
                try:
                    _merge(root / model_folder_name(model), finished[model], spec["variants"])
                    print(f"{model} {variant}: done")
                    continue
                except HubquantError as error:
                    finished[model].pop()
                    answer = {"ok": False, "error": str(error)}
            failures.append({"model": model, "variant": variant, "error": answer["error"]})
            print(f"{model} {variant}: error: {answer['error']}")
    result_files = [
        root / model_folder_name(m) / "results.json"
        for m in spec["models"]
        if (root / model_folder_name(m) / "results.json").is_file()
    ]
    report = None
    if result_files:
        from hubquant.reports import compare

        report = [str(p) for p in compare(result_files, root)]
    summary = {
        "models": spec["models"],
        "variants": spec["variants"],
        "ran": [list(t) for t in todo],
        "skipped": [list(t) for t in skipped],
        "failed": failures,
        "report": report,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"sweep: {len(todo) - len(failures)} ran, {len(skipped)} skipped, {len(failures)} failed; {root}")
    return summary


def _ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise HubquantError("hubquant sweep needs Ray: pip install 'hubquant[scale]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    return ray
