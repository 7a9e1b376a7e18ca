"""`hubquant sweep SWEEP.yaml`: many models x variants, one Ray task each, one report at the end.

    models: [HuggingFaceTB/SmolLM2-135M, ./my-folder]
    variants: [base, int4, int8]
    dataset: python-docs
    eval: {ctx: 512, max_chunks: 32, dtype: bf16}     # any `hubquant eval` setting
    out: results/sweep                                 # optional; --out wins

Each (model, variant) is one Ray task running the very code of `hubquant eval` for that variant
(`run_eval(EvalSettings(variants=(variant,), ...))`) in a folder of its own (OUT/<model>/tasks/<variant>/). A task asks
Ray for what its variant needs (a GPU when the eval runs on one; one CPU otherwise; memory: the
checkpoint's bytes twice), so Ray packs tasks onto the cluster's machines. As tasks finish, the
driver (one process: no two writers) merges their rows into OUT/<model>/results.json, exactly
where `hubquant eval --out OUT/<model>` writes, with its report. A rerun skips every (model,
variant) already there with the same settings, as `hubquant eval` does; a failed task is reported
with its one-line error and the others go on. At the end every model's results are merged into one
side-by-side report (`hubquant report`): OUT/report.html and OUT/report.csv.

Without `--address`, a private Ray starts on this machine (`ray.init(address="local")`) and stops
at the end, so the command works anywhere; it never joins a cluster it finds (RAY_ADDRESS, or the
note /tmp/ray/ray_current_cluster that an unstopped `ray start` leaves). `--address HEAD:6379` joins
a cluster from one of its machines (the GCS address `ray start --head` prints), `--address
ray://HEAD:10001` from anywhere (Ray Client). An address that does not answer is a one-line error
within 30 s (HUBQUANT_RAY_CONNECT_TIMEOUT, in seconds, changes that). Ray is an optional extra:
`pip install 'hubquant[scale]'` (ray[client]).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.quantize.registry import default_variants, variant_folder
from hubquant.reports import compare, write_report

from .results import Row, model_folder_name, read_results, rows_of, save_results, verdict
from .settings import EvalSettings, check_variants

SPEC_KEYS = ("models", "variants", "dataset", "eval", "out")
# `EvalSettings` a sweep file may give under `eval:` (everything but where and what).
_NOT_SETTINGS = {"model", "variants", "dataset", "out", "force", "progress", "revision"}
CONNECT_TIMEOUT_ENV = "HUBQUANT_RAY_CONNECT_TIMEOUT"
CONNECT_TIMEOUT_S = 30.0  # the default; CONNECT_TIMEOUT_ENV overrides it (seconds)
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's defaults for `ray start --head`


def _eval_settings() -> list[str]:
    return [name for name in EvalSettings.names() if name not in _NOT_SETTINGS]


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
    variants = spec.get("variants", list(default_variants()))
    if not isinstance(variants, list) or not variants or not all(isinstance(v, str) for v in variants):
        raise HubquantError(f"{path}: 'variants' must be a non-empty list such as [base, int4, int8]")
    check_variants(variants)
    settings = spec.get("eval") or {}
    if not isinstance(settings, dict):
        raise HubquantError(f"{path}: 'eval' must be a mapping of `hubquant eval` settings")
    bad = sorted(set(settings) - set(_eval_settings()))
    if bad:
        raise HubquantError(
            f"{path}: eval setting '{bad[0]}' is unknown; use any of {', '.join(_eval_settings())}"
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


def _task(model: str, variant: str, dataset: str, settings: dict[str, Any], out: str) -> dict[str, Any]:
    """One (model, variant): `hubquant eval`'s code in its own folder; never raises (a failure comes
    back as its one-line error)."""
    from .run import run_eval

    try:
        eval_settings = EvalSettings(
            model=model, variants=(variant,), dataset=dataset, out=out, progress=False, **settings
        )
        results = run_eval(eval_settings)
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
    judged = verdict(ordered, header.get("budget") or {}, header.get("task"))
    merged = save_results(path, header, ordered, judged)
    write_report(merged, model_out)
    return merged


def _same_settings(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(old.get(key) == new.get(key) for key in ("model", "dataset", "method", "budget"))


def run_sweep(
    spec_path: str | Path, *, address: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Run a sweep file (see the module docstring); returns its summary (also OUT/sweep.json).

    Args:
        spec_path: the YAML file.
        address: a Ray cluster: "HEAD:6379" (its GCS, from a machine of the cluster),
            "ray://HEAD:10001" (Ray Client, from anywhere) or "auto" (RAY_ADDRESS, else the cluster
            `ray start` noted on this machine); None or "local": a private Ray on this machine.
            Used as it is when Ray is already initialized in this process.
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
            done = {r["variant"] for r in read_results(path).get("rows", [])}
        for variant in spec["variants"]:
            (skipped if variant in done else todo).append((model, variant))
    for model, variant in skipped:
        print(f"{model} {variant}: already in {root / model_folder_name(model) / 'results.json'}; skipped")
    failures: list[dict[str, str]] = []
    finished: dict[str, list[dict[str, Any]]] = {}
    if todo:
        ray, started = _ray(address)
        try:
            _run_tasks(ray, todo, spec, root, finished, failures)
        finally:
            if started:
                ray.shutdown()
    result_files = [
        root / model_folder_name(m) / "results.json"
        for m in spec["models"]
        if (root / model_folder_name(m) / "results.json").is_file()
    ]
    report = None
    if result_files:
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


def _run_tasks(
    ray: Any,
    todo: list[tuple[str, str]],
    spec: dict[str, Any],
    root: Path,
    finished: dict[str, list[dict[str, Any]]],
    failures: list[dict[str, str]],
) -> None:
    """Submit every (model, variant) of `todo` and merge each answer as it comes back."""
    remote = ray.remote(_task)
    pending = {}
    for model, variant in todo:
        task_out = root / model_folder_name(model) / "tasks" / variant_folder(variant)
        options = _resources(model, spec["eval"])
        ref = remote.options(**options).remote(model, variant, spec["dataset"], spec["eval"], str(task_out))
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


def _ray(address: str | None) -> tuple[Any, bool]:
    """Ray, ready: (the module, whether this call started or joined it, so the caller shuts it
    down). An already initialized Ray (the caller's own `ray.init`) is used as it is.

    Without an address Ray starts privately on this machine (`address="local"`): neither
    RAY_ADDRESS nor the note of an earlier `ray start` (/tmp/ray/ray_current_cluster) is followed,
    so a stale note cannot make the sweep join, or wait for, a cluster that is gone. With one, an
    unreachable cluster is a one-line error within the connect timeout (see `_connect`)."""
    try:
        import ray
    except ImportError:
        raise HubquantError("hubquant sweep needs Ray: pip install 'hubquant[scale]'") from None
    if ray.is_initialized():
        return ray, False
    if not address or address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        _connect(ray, address)
    return ray, True


def _connect_timeout() -> float:
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    if not text:
        return CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise HubquantError(f"{CONNECT_TIMEOUT_ENV}={text!r}: give the seconds, e.g. 30")
    return value


def _host_port(address: str) -> tuple[str, str, int] | None:
    """`address` as Ray will be given it, with its host and port; None for addresses that only
    Ray resolves ("auto", other schemes)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    elif scheme != "ray":
        return None
    if rest == "auto" or not rest:
        return None
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or "]" in port:  # no port given: Ray's default for the form
        host, port = rest.rstrip("/"), str(CLIENT_PORT if scheme else GCS_PORT)
    if not port.isdigit() or not host:
        raise HubquantError(
            f"--address {address!r} is not HOST:PORT; give HEAD:{GCS_PORT} (on a machine of the "
            f"cluster) or ray://HEAD:{CLIENT_PORT} (from anywhere)"
        )
    full = f"{scheme}://{host}:{port}" if scheme else f"{host}:{port}"
    return full, host.strip("[]"), int(port)


def _connect(ray: Any, address: str) -> None:
    """`ray.init(address)` that gives up in bounded time with one line: a TCP probe of the address
    first (a dead port or host answers at once, a silent one within the probe's timeout), then
    `ray.init` under a watchdog, since Ray itself retries an unreachable GCS for many minutes."""
    timeout = _connect_timeout()
    deadline = time.monotonic() + timeout
    fix = (
        "start it (`ray start --head`) and open its port, give HEAD:6379 on a machine of the cluster "
        "or ray://HEAD:10001 from elsewhere, or leave out --address to run on this machine"
    )
    target = _host_port(address)
    if target is not None:
        address, host, port = target
        if address.startswith("ray://"):
            if find_spec("grpc") is None:
                raise HubquantError(
                    f"--address {address} needs Ray Client: pip install 'hubquant[scale]' "
                    "(which installs ray[client])"
                )
        try:
            socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            if isinstance(error, socket.timeout):
                reason = "no answer"
            raise HubquantError(f"cannot reach the Ray cluster at {address} ({reason}); {fix}") from None
    watch = _ConnectWatch()
    loggers = [logging.getLogger(name) for name in ("ray._private.worker", "ray.util.client.worker")]
    levels = [logger.level for logger in loggers]
    loggers[1].setLevel(logging.DEBUG)  # Ray Client says why a ping failed at DEBUG only
    for logger in loggers:
        logger.addFilter(watch)
    try:
        while True:
            done = _init_within(ray, address, deadline, watch)
            error = done.get("error")
            # Ray Client's proxy starts a server per client; on a busy head that start can fail
            # once ("Initialization failure from server") and work when asked again.
            if error is None or not _transient(error) or time.monotonic() > deadline - 1:
                break
            try:
                ray.shutdown()
            except Exception:  # nothing to shut down after a failed start
                pass
            time.sleep(1.0)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeFilter(watch)
            logger.setLevel(level)
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    if watch.refused or any("AuthenticationError" in text or "InvalidAuthToken" in text for text in chain):
        raise HubquantError(
            f"the Ray cluster at {address} uses token authentication and refused this machine's "
            "token (or its lack of one): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the "
            "cluster's token (`ray get-auth-token` on the head prints it)"
        )
    if "error" not in done:
        raise HubquantError(
            f"no answer from the Ray cluster at {address} within {timeout:g} s "
            f"({CONNECT_TIMEOUT_ENV} sets the limit); {fix}"
        )
    if error is None:
        return
    text = str(error).strip()
    if "ray[client]" in text:
        raise HubquantError(
            f"--address {address} needs Ray Client: pip install 'hubquant[scale]' (which installs ray[client])"
        )
    first = text.splitlines()[0].rstrip(". ") if text else type(error).__name__
    raise HubquantError(f"cannot connect to the Ray cluster at {address}: {first}; {fix}")


TRANSIENT_CONNECT_ERRORS = ("Initialization failure from server",)


def _transient(error: BaseException) -> bool:
    """Whether a failed `ray.init` is one that asking again can cure."""
    return any(text in str(error) for text in TRANSIENT_CONNECT_ERRORS)


def _init_within(ray: Any, address: str, deadline: float, watch: _ConnectWatch) -> dict[str, Any]:
    """`ray.init(address)` in a thread, waited for until it ends, the watch sees the token
    refused, or the deadline: {"error": None or the exception} when it ended, else {}."""
    done: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
            done["error"] = None
        except BaseException as error:  # handed to the waiting thread
            done["error"] = error

    thread = threading.Thread(target=init, name="hubquant-ray-connect", daemon=True)
    thread.start()
    while "error" not in done and not watch.refused and time.monotonic() < deadline:
        thread.join(min(0.25, max(deadline - time.monotonic(), 0.0)))
    return done


class _ConnectWatch(logging.Filter):
    """On Ray's loggers while `_connect` waits: notes a Ray Client ping refused for its token (Ray
    retries those until its own timeout, saying why at DEBUG only) and drops Ray's DEBUG lines and
    its note that a driver started outside the main thread sets no SIGTERM handler (that handler
    only makes SIGTERM run atexit; a driver joining a cluster owns no processes to stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Received when checking init:" in message and "authentication token" in message.lower():
            self.refused = True
        return record.levelno > logging.DEBUG and "SIGTERM handler is not set" not in message
