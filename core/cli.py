"""The `hubquant` command. Errors print as one line and exit non-zero; `--debug` shows tracebacks
and the libraries' own warnings and log lines."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

# Neither import pulls in torch: `--help`, `--version` and argument errors answer without it.
# Commands import torch (and the rest) inside their own functions.
from hubquant import __version__
from hubquant.errors import HubquantError
from hubquant.evaluate.settings import DEFAULT_CALIB_LEN, DEFAULT_CALIB_SAMPLES, EvalSettings
from hubquant.evaluate.sweep import run_sweep
from hubquant.models.config import DTYPE_NAMES
from hubquant.quantize.card import report_summary
from hubquant.quantize.push import push
from hubquant.quantize.registry import default_variants, get_method, method_names
from hubquant.reports import compare


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from hubquant.models import load

    model, tokenizer = load(
        args.source,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        max_memory=parse_max_memory(args.max_memory),
    )
    if model.config.kind == "encoder":
        raise HubquantError(
            f"{args.source} is an encoder (BERT), which does not generate text; "
            f"use `hubquant embed {args.source} --text ...`"
        )
    if tokenizer is None:
        raise HubquantError(f"{args.source} ships no tokenizer.json, so text cannot be generated from it")
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_ids=tokenizer.eos_ids,
        generator=generator,
        compile=args.compile,
    )
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1] :]))


def _cmd_embed(args: argparse.Namespace) -> None:
    from hubquant.models import load
    from hubquant.models.embed import embed

    texts = list(args.text or [])
    if args.file:
        try:
            texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise HubquantError(f"cannot read --file {args.file}: {error}") from None
    if not texts:
        raise HubquantError(
            "nothing to embed: give --text TEXT (repeatable) or --file FILE (one text per line)"
        )
    model, tokenizer = load(args.source, revision=args.revision, dtype=args.dtype, device=args.device)
    vectors = embed(model, texts, batch_size=args.batch_size, tokenizer=tokenizer)
    sentence = getattr(model, "sentence", None)
    how = sentence.describe() if sentence is not None else ""
    if args.json:
        print(json.dumps({"model": str(args.source), "dim": vectors.shape[1], "method": how,
                          "texts": texts, "embeddings": vectors.tolist()}))  # fmt: skip
        return
    print(f"{len(texts)} embeddings of {vectors.shape[1]} dims; {how}")
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        head = " ".join(f"{v:+.4f}" for v in vector[:6].tolist())
        short = text if len(text) <= 50 else text[:47] + "..."
        print(f"[{i}] norm {vector.norm().item():.4f}  [{head} ...]  {short!r}")
    if len(texts) > 1:
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        print("cosine similarity:")
        for i, row in enumerate((unit @ unit.T).tolist()):
            print(f"[{i}] " + " ".join(f"{v:6.3f}" for v in row))


def parse_max_memory(text: str | None) -> dict[str | int, str] | None:
    """`--max-memory 0=20GiB,1=20GiB,cpu=60GiB,disk=200GiB` as load's `max_memory`."""
    if not text:
        return None
    out: dict[str | int, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise HubquantError(
                f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB,disk=200GiB"
            )
        out[int(key) if key.isdigit() else key] = value
    return out


def _cmd_sweep(args: argparse.Namespace) -> None:
    summary = run_sweep(args.spec, address=args.address, out=args.out)
    if summary["failed"]:
        raise HubquantError(
            f"{len(summary['failed'])} of the sweep's tasks failed (listed above and in sweep.json); "
            "fix them and rerun: finished ones are skipped"
        )


def _cmd_convert(args: argparse.Namespace) -> None:
    from hubquant.convert import convert

    out = convert(
        args.source,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        force=args.force,
        revision=args.revision,
    )
    print(f"wrote {out}")


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """`hubquant eval`'s flags as the one settings value the driver takes."""

    def names(text: str | None) -> tuple[str, ...] | None:
        return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None

    return EvalSettings(
        model=args.model,
        variants=names(args.variants),
        task=args.task,
        dataset=args.dataset,
        ctx=args.ctx,
        max_chunks=args.max_chunks,
        ppl_method=args.ppl_method,
        stride=args.stride,
        max_tokens=args.max_tokens,
        max_sentences=args.max_sentences,
        dtype=args.dtype,
        tasks=names(args.tasks),
        speed=not args.no_speed,
        compile=args.compile,
        device=args.device or "auto",
        device_map=args.device_map,
        max_memory=parse_max_memory(args.max_memory),
        out=args.out,
        force=args.force,
        max_kld=args.max_kld,
        min_top1=args.min_top1,
        min_cosine=args.min_cosine,
        revision=args.revision,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
    )


def _cmd_eval(args: argparse.Namespace) -> None:
    from hubquant.evaluate.run import run_eval

    run_eval(eval_settings(args))


def _cmd_quantize(args: argparse.Namespace) -> None:
    if args.force and not args.out:
        raise HubquantError("--force replaces an existing --out folder; it needs --out")
    options = dict(group_size=args.group_size, hqq=args.hqq, include_head=args.include_head, head=args.head)
    calibrated = get_method(args.method).calibrated
    if calibrated and not args.out:
        raise HubquantError(f"{args.method} calibrates layer by layer while writing; add --out DIR")
    if args.act_order and args.method != "int4-gptq":
        raise HubquantError(f"--act-order applies to int4-gptq, not to {args.method}")
    given = [f for f in ("calib_dataset", "calib_samples", "calib_len") if getattr(args, f) is not None]
    if given and not calibrated:
        flag = "--" + given[0].replace("_", "-")
        raise HubquantError(
            f"{flag} applies to calibrated methods (int4-gptq, int4-awq), not to {args.method}"
        )
    if args.device_map and not args.out:
        raise HubquantError("--device-map streams the checkpoint into --out; add --out DIR")
    if args.out:
        from hubquant.quantize.calibration import CalibrationSettings
        from hubquant.quantize.core import quantize_checkpoint

        method = args.method + (":act" if args.act_order else "")
        calibration = None
        if calibrated:
            calibration = CalibrationSettings(
                dataset=args.calib_dataset or "python-docs",
                **({"samples": args.calib_samples} if args.calib_samples is not None else {}),
                **({"length": args.calib_len} if args.calib_len is not None else {}),
            )
        out, report = quantize_checkpoint(
            args.model,
            args.out,
            method,
            calibration=calibration,
            dtype=args.dtype,
            revision=args.revision,
            force=args.force,
            device_map=args.device_map,
            max_memory=parse_max_memory(args.max_memory),
            device=None if args.device_map else args.device,
            **options,
        )
        print(report_summary(report))
        print(f"wrote {out}")
        return
    from hubquant.models import load
    from hubquant.quantize.core import quantize

    model, _ = load(args.model, revision=args.revision, dtype=args.dtype, device="cpu")
    report = quantize(model, args.method, **options)
    print(report_summary(report))
    print("nothing written: add --out DIR to save the quantized model")


def _cmd_push(args: argparse.Namespace) -> None:
    url = push(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        results=args.results,
    )
    if not args.dry_run:
        print(f"pushed {args.folder} to {args.repo_id}: {url}")


def _cmd_report(args: argparse.Namespace) -> None:
    if args.out is None:
        if len(args.results) > 1:
            raise HubquantError("several results files need --out DIR: where to write the combined report")
        only = Path(args.results[0])
        args.out = only if only.is_dir() else only.parent
    csv_path, html_path = compare(args.results, args.out)
    print(f"wrote {csv_path}")
    print(f"wrote {html_path}")


def _device_defaults(device: str | None) -> tuple[str, str]:
    """The device to run on and its natural dtype: bf16 on a GPU; fp32 on a CPU, where bf16
    matrix products are slower and only approximate the checkpoint's own precision."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, ("fp32" if device.partition(":")[0] == "cpu" else "bf16")


def build_parser() -> argparse.ArgumentParser:
    """The command line: `generate`, `embed`, `convert`, `eval`, `quantize`, `push`, `sweep` and `report`, each
    with its options."""
    parser = argparse.ArgumentParser(prog="hubquant", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and the libraries' warnings and log lines"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    gen.add_argument("source", help="Hub repo id or local checkpoint folder")
    gen.add_argument("--prompt", default="The capital of France is")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--compile", action="store_true", help="decode with a compiled step (cached; first run compiles)"
    )
    gen.set_defaults(func=_cmd_generate)

    emb = sub.add_parser("embed", help="sentence embeddings from an encoder (BERT) checkpoint")
    emb.add_argument(
        "source", help="Hub repo id or local checkpoint folder (e.g. a sentence-transformers model)"
    )
    emb.add_argument("--text", action="append", help="a text to embed (repeatable)")
    emb.add_argument("--file", default=None, help="a text file: one text per non-empty line")
    emb.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    emb.add_argument("--json", action="store_true", help="print the full vectors as JSON")
    emb.set_defaults(func=_cmd_embed)

    conv = sub.add_parser("convert", help="GGUF / pickle / safetensors checkpoint -> clean Hub-layout folder")
    conv.add_argument("source", help="Hub repo id, local HF folder, folder of .bin shards, or a .gguf file")
    conv.add_argument("--out", required=True, help="output folder (written atomically)")
    conv.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    conv.add_argument("--force", action="store_true", help="replace a non-empty --out")
    conv.set_defaults(func=_cmd_convert, dtype_default="bf16")

    ev = sub.add_parser(
        "eval", help="measure a checkpoint, decoder or BERT encoder (default: the embedded SmolLM2-135M)"
    )
    ev.add_argument("model", nargs="?", default=None, help="Hub repo id or folder; empty: embedded default")
    ev.add_argument("--variants", default=None,
                    help=f"comma-separated: base,{','.join(method_names())},gguf:PATH, a method with settings "
                    f"after colons (int4:g64, int4:head-int8: an int8 output head) "
                    f"(default {','.join(default_variants())})")  # fmt: skip
    ev.add_argument("--task", default=None,
                    help="evaluation task: causal-lm, masked-lm, embedding (default: picked by the model)")  # fmt: skip
    ev.add_argument("--dataset", default="python-docs", help="python-docs, wikitext2 or a .txt file")
    ev.add_argument("--ctx", type=int, default=None,
                    help="tokens per window (default 512; masked-LM encoders 128)")  # fmt: skip
    ev.add_argument("--max-chunks", type=int, default=None, help="score at most N windows")
    ev.add_argument("--ppl-method", choices=("chunks", "sliding"), default="chunks",
                    help="chunks: llama.cpp's (second half of each window); sliding: transformers' guide")  # fmt: skip
    ev.add_argument("--stride", type=int, default=None, help="sliding only: tokens between windows")
    ev.add_argument("--max-tokens", type=int, default=None, help="use only the text's first N tokens")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, scored per variant")
    ev.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    timing = ev.add_mutually_exclusive_group()
    timing.add_argument("--compile", action="store_true", default=None,
                        help="time decode with the compiled step (the default on a GPU)")  # fmt: skip
    timing.add_argument("--eager", dest="compile", action="store_false", default=None,
                        help="time decode eagerly (the default on the CPU)")  # fmt: skip
    ev.add_argument("--out", default=None, help="results folder (default results/<org>__<name>)")
    ev.add_argument("--force", action="store_true", help="start over even if OUT holds results")
    ev.add_argument("--max-kld", type=float, default=0.05, help="verdict budget: mean KLD, nats")
    ev.add_argument("--min-top1", type=float, default=0.90, help="verdict budget: top-1 agreement, 0..1")
    ev.add_argument("--max-sentences", type=int, default=None,
                    help="embedders: judge on the text's first N sentences (default 512)")  # fmt: skip
    ev.add_argument("--min-cosine", type=float, default=0.99,
                    help="embedders' verdict budget: mean cosine to the base's sentence vectors")  # fmt: skip
    ev.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                    help="calibrated variants (int4-gptq, int4-awq): sequences drawn from the calibration slice "
                    f"of --dataset, which is never scored (default {DEFAULT_CALIB_SAMPLES})")  # fmt: skip
    ev.add_argument("--calib-len", type=int, default=DEFAULT_CALIB_LEN,
                    help=f"calibrated variants: tokens per sequence (default {DEFAULT_CALIB_LEN})")  # fmt: skip
    ev.set_defaults(func=_cmd_eval, dtype_default="bf16")

    quant = sub.add_parser("quantize", help=f"quantize a checkpoint ({', '.join(method_names())})")
    quant.add_argument("model", help="Hub repo id or local checkpoint folder")
    quant.add_argument("--method", required=True, choices=method_names(), help="quantization method")
    quant.add_argument(
        "--group-size", type=int, default=None, help="int4: values per scale (default 128, else 64 or 32)"
    )
    quant.add_argument("--hqq", action="store_true", help="int4: choose scales with HQQ's parameter search")
    quant.add_argument("--include-head", action="store_true", help="also quantize the output head")
    quant.add_argument("--head", default=None, choices=method_names(), metavar="METHOD",
                       help="quantize the output head with METHOD (int8 beside int4 layers, as llama.cpp's "
                       "4-bit files keep an 8-bit head); torchao methods only")  # fmt: skip
    quant.add_argument("--act-order", action="store_true",
                       help="int4-gptq: round columns by decreasing activation (groups stay static)")  # fmt: skip
    quant.add_argument("--calib-dataset", default=None,
                       help="int4-gptq, int4-awq: python-docs (default), wikitext2 or a .txt file; its calibration "
                       "slice (the last quarter of its tokens, never scored by eval) is used")  # fmt: skip
    quant.add_argument("--calib-samples", type=int, default=None,
                       help="int4-gptq, int4-awq: calibration sequences (default 16)")  # fmt: skip
    quant.add_argument("--calib-len", type=int, default=None,
                       help="int4-gptq, int4-awq: tokens per calibration sequence (default 128)")  # fmt: skip
    quant.add_argument(
        "--out",
        default=None,
        help="write the quantized folder here; without it, quantize in memory and report",
    )
    quant.add_argument("--force", action="store_true", help="replace a non-empty --out")
    quant.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    quant.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="dtype of what stays unquantized (default bf16)",
    )
    quant.set_defaults(func=_cmd_quantize)

    up = sub.add_parser("push", help="upload a quantized folder to the Hub in one commit")
    up.add_argument("folder", help="the folder `hubquant quantize --out` wrote")
    up.add_argument("--repo-id", required=True, help="ORG/NAME; created if missing")
    up.add_argument("--private", action="store_true", help="create the repo private")
    up.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    up.add_argument("--dry-run", action="store_true", help="print the files and the card; contact nothing")
    up.add_argument(
        "--results",
        default=None,
        metavar="PATH",
        help="results.json of `hubquant eval` whose figures for this variant (and the base's) go into the "
        "card (default: OUT/results.json when the folder is OUT/variants/NAME)",
    )
    up.set_defaults(func=_cmd_push)

    sw = sub.add_parser("sweep", help="models x variants from a YAML file, one Ray task each, one report")
    sw.add_argument("spec", help="the sweep file (models, variants, dataset, eval settings)")
    sw.add_argument(
        "--address",
        default=None,
        help="a Ray cluster: HEAD:6379 from a machine of the cluster, ray://HEAD:10001 from anywhere; default: a private Ray on this machine",
    )
    sw.add_argument(
        "--out", default=None, help="results folder (default: the file's out, else results/sweep)"
    )
    sw.set_defaults(func=_cmd_sweep)

    rep = sub.add_parser("report", help="CSV and HTML report of one or more `hubquant eval` runs")
    rep.add_argument("results", nargs="+", help="results.json files (or the folders holding them)")
    rep.add_argument(
        "--out", default=None, help="folder for report.csv and report.html (default: beside a single results)"
    )
    rep.set_defaults(func=_cmd_report)

    for p in (gen, emb, conv, ev):
        p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
        p.add_argument(
            "--dtype",
            choices=DTYPE_NAMES,
            default=None,
            help="default: fp32 on cpu, bf16 on a GPU (convert: bf16)",
        )
    for p in (gen, ev, quant):
        p.add_argument("--device-map", default=None, help="'auto': spread the model over GPUs, CPU and disk")
        p.add_argument(
            "--max-memory", default=None, help="with --device-map: e.g. 0=20GiB,cpu=60GiB,disk=200GiB"
        )
    for p in (gen, emb, ev):
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    quant.add_argument(
        "--device",
        default=None,
        help="quantize each layer on: cpu, cuda, cuda:1... (default: cuda if available)",
    )
    return parser


def _fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the machine. They need torch, so they are computed only once a
    command is about to run, never for `--help` or an argument error."""
    if not hasattr(args, "dtype"):
        return  # push
    if hasattr(args, "device"):
        args.device, default_dtype = _device_defaults(args.device)
    else:
        default_dtype = "bf16"  # convert's output
    # eval: bf16 everywhere, the activations the quantized variants run with (int4's CPU kernel too).
    args.dtype = args.dtype or getattr(args, "dtype_default", None) or default_dtype


# Library chatter: the warnings and log lines the packages hubquant drives print on their own while a
# command runs (huggingface_hub's retries, torchao's import-time notes, torch's deprecations...).
# Without `--debug` they are hidden, each where it is made:
# - libraries that configure a logger of their own when imported (a handler and a level, read from
#   an environment variable) are told through that variable, before they are imported; if one is
#   imported already (main() called in-process), its logger's level is set as well. A variable
#   the user has set is left alone, and so is that library's logger;
# - torch's python logs (`W... torch/utils/_pytree.py:...] ...`, which torchao triggers on import)
#   follow TORCH_LOGS, which torch reads at import and which cannot go above ERROR; its C++ log
#   lines (printed by c10 straight to stderr) follow TORCH_CPP_LOG_LEVEL;
# - every other logger (torchao's "Failed to load ..._C_cutlass_90a.abi3.so", urllib3, httpx,
#   filelock, bitsandbytes, lm-eval, gguf...) inherits the root logger's level, which is raised
#   above CRITICAL; hubquant's own loggers keep WARNING, so its notes still show;
# - python warnings (torch's C++ warnings become python warnings) are ignored, except hubquant's.
# tqdm progress bars are untouched. Everything is restored when the command ends.
_QUIET = logging.CRITICAL + 1
# environment variable -> (its quiet value, the logger the library configures from it)
_LIBRARY_VERBOSITY: dict[str, tuple[str, str | None]] = {
    "HF_HUB_VERBOSITY": ("critical", "huggingface_hub"),
    "TRANSFORMERS_VERBOSITY": ("critical", "transformers"),
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": ("1", None),
    "DATASETS_VERBOSITY": ("critical", "datasets"),
    "EVALUATE_VERBOSITY": ("critical", "evaluate"),
    "LMEVAL_LOG_LEVEL": ("CRITICAL", "lm_eval"),
    "TORCH_LOGS": ("-all", "torch"),
    "TORCH_CPP_LOG_LEVEL": ("ERROR", None),
}


@contextlib.contextmanager
def library_chatter_hidden() -> Iterator[None]:
    """Hide other libraries' warnings and log lines while the block runs (see `_QUIET` above);
    hubquant's own warnings, log lines and progress bars still show."""
    saved_env = {name: os.environ.get(name) for name in _LIBRARY_VERBOSITY}
    loggers = [logging.getLogger(), logging.getLogger("hubquant")]
    for name, (value, logger) in _LIBRARY_VERBOSITY.items():
        if saved_env[name] is None:
            os.environ[name] = value
            if logger is not None:
                loggers.append(logging.getLogger(logger))
    saved_levels = [(logger, logger.level) for logger in loggers]
    for logger in loggers[2:]:
        logger.setLevel(_QUIET)
    loggers[0].setLevel(_QUIET)  # the root: every logger without a level of its own
    if loggers[1].level == logging.NOTSET:
        loggers[1].setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", message="hubquant")
            yield
    finally:
        for logger, level in saved_levels:
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `hubquant` command line.

    Args:
        argv: the arguments, without the program name (default: `sys.argv[1:]`).

    Without `--debug`, stderr holds hubquant's own lines and progress bars only: the libraries'
    warnings and log lines are hidden while the command runs (`library_chatter_hidden`).

    Returns:
        The exit status: 0 on success, 1 on an error (printed as one line), 130 on Ctrl-C.
        `--help`, `--version` and argument errors exit through argparse (SystemExit 0 or 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.nullcontext() if args.debug else library_chatter_hidden():
            _fill_defaults(args)
            args.func(args)
    except HubquantError as error:
        if args.debug:
            raise
        print(f"hubquant: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubquant: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything unforeseen still gets one line
        if args.debug:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        print(
            f"hubquant: error: {type(error).__name__}: {first} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
