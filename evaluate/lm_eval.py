"""lm-eval's model "hubquant": scores a checkpoint, or one of its quantized variants, with lm-evaluation-harness.

Ways in:

- `python -m hubquant.evaluate.lm_eval --model hubquant --model_args pretrained=X,variant=int4
  --tasks ...` runs lm-eval's own command line, every flag of it, with "hubquant" registered;
- `lm_eval.simple_evaluate(model="hubquant", model_args="pretrained=X,variant=int4", ...)` after
  `import hubquant`;
- `run_tasks(model, tasks, tokenizer)` scores a model already loaded (and quantized), as
  `hubquant eval --tasks` does for each variant; `check_tasks` refuses unknown task names early.

lm-eval 0.4 has no plugin discovery (it reads no entry points), so `import hubquant` puts
"hubquant" into lm-eval's model registry itself, as a lazy "module:Class" placeholder, at the moment
lm-eval's registry module is imported (see `hubquant/__init__.py`): neither lm-eval nor torch is
imported by `import hubquant`, and this module only when lm-eval first asks for the model.

Model args (`--model_args` or `model_args=`): `pretrained` (Hub id or local folder), `variant`
(base, int4, nf4, int8, fp8: quantized in memory after loading), `dtype` (bf16, fp16, fp32),
`device` (auto, cpu, cuda, cuda:N), `batch_size`, `max_length` (default: the checkpoint's context
length), `max_gen_toks` (default 256), `revision`, `add_bos_token` (default: what the tokenizer
itself does; True or False overrides it, as for lm-eval's `hf` model), `prefix_token_id` (the token
an empty context is scored after; default bos, else eos).

How it scores, request type by request type, matching lm-eval's `hf` model:

- `loglikelihood`: context and continuation are tokenized together and split where the context's own
  tokens end (lm-eval's `TemplateLM` does this); inputs are cut from the left to `max_length`.
  Requests are sorted longest first and run `batch_size` at a time, right-padded. Log-probabilities
  are the log-softmax of fp32 logits, whatever the model's dtype.
- `loglikelihood_rolling`: the text's tokens, after the prefix token, in lm-eval's disjoint rolling
  windows of `max_length`; each token is scored once.
- `generate_until`: requests with the same generation settings are batched together, longest first,
  left-padded; greedy unless the task asks for sampling (temperature, top_k, top_p); a row stops at
  an eos token or once its text holds a stop sequence, and its text is cut at the first one.
"""

from __future__ import annotations

import json
import logging
import numbers
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.__main__ as lm_eval_cli
import lm_eval.models  # noqa: F401  lm-eval's own names, which it adds only to an empty registry
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from hubquant.errors import HubquantError
from hubquant.models.config import torch_dtype
from hubquant.models.decoder import Decoder
from hubquant.models.generate import filter_logits
from hubquant.models.layers import KVCache
from hubquant.models.tokenizer import Tokenizer
from hubquant.quantize import quantize
from hubquant.quantize.registry import method_names

logger = logging.getLogger(__name__)

MODEL_NAME = "hubquant"  # the name lm-eval knows the model by
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's hf model

# Generation settings a task may give, beyond `until` and the max-token aliases.
_GEN_SETTINGS = ("do_sample", "temperature", "top_k", "top_p")

# One scoring request: (the strings, for lm-eval's cache, or None), context tokens, continuation tokens.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise HubquantError(f"model arg {name}={value!r} must be a whole number of 1 or more")
    return number


def _token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise HubquantError(f"model arg {name}={value!r} must be a token id (a whole number, 0 or more)")
    return int(value)


def _optional_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise HubquantError(f"model arg {name}={value!r} must be true or false")


def _resolve_device(device: Any) -> torch.device:
    """The device to run on: None or "auto" picks cuda when torch sees a GPU, else cpu."""
    from hubquant.models.loading import torch_device

    if device is None or str(device).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line passes --device cuda:0 when none is given; its hf model then
        # runs on the cpu, and so does this one, saying so.
        logger.warning("device %r asked for, but torch sees no CUDA GPU here; using cpu", device)
        return torch.device("cpu")
    return torch_device(device)


class HubquantLM(TemplateLM):
    """A hubquant decoder, base or quantized in memory, as an lm-eval model.

    Args:
        pretrained: a Hub repo id or a local Hub-layout folder; or a model `hubquant.load` gave
            (quantized or not), scored as it is, with `tokenizer`.
        variant: "base" (unquantized, in `dtype`) or a quantize method: "int4", "nf4", "int8",
            "fp8", applied in memory after loading with the method's defaults.
        dtype: weight dtype the checkpoint is loaded in: "bf16", "fp16" or "fp32" (or bfloat16...).
        device: "auto" (default: cuda if there is a GPU), "cpu", "cuda" or "cuda:N".
        batch_size: requests per forward pass (lm-eval passes its --batch_size).
        max_length: the most tokens one forward pass sees; default: the checkpoint's context length.
        max_gen_toks: tokens `generate_until` produces when the task does not say.
        revision: Hub branch, tag or commit.
        add_bos_token: None: tokenize as the tokenizer itself does; True or False: prepend bos, or
            not, whatever the tokenizer does (lm-eval's `hf` model has the same argument).
        prefix_token_id: the token an empty context is scored after (default: bos, else eos).
        max_batch_size: accepted because lm-eval passes it; unused (no automatic batch size).
        progress: show a progress bar while loading and quantizing.
        tokenizer: the tokenizer of a loaded model given as `pretrained` (not a model arg).
        **unknown: refused, naming the accepted args.

    Raises:
        HubquantError: for a bad arg (checked before anything is loaded) or a checkpoint that
            cannot be loaded or quantized.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | Decoder | None = None,
        variant: str = "base",
        dtype: str = "bf16",
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        revision: str | None = None,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        max_batch_size: int | None = None,
        progress: bool | str = True,
        tokenizer: Tokenizer | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            accepted = (
                "pretrained, variant, dtype, device, batch_size, max_length, max_gen_toks, revision, "
                "add_bos_token, prefix_token_id, progress"
            )
            raise HubquantError(
                f"model arg(s) {', '.join(sorted(unknown))} unknown to the {MODEL_NAME} model; it takes {accepted}"
            )
        if pretrained is None or (isinstance(pretrained, str) and not pretrained.strip()):
            raise HubquantError(
                f"the {MODEL_NAME} model needs pretrained=<Hub id or folder> in its model args"
            )
        variant = str(variant).strip().lower()
        if variant != "base" and variant not in method_names():
            known = ", ".join(("base", *method_names()))
            raise HubquantError(f"model arg variant={variant!r} is unknown; use one of {known}")
        if str(batch_size).startswith("auto"):
            raise HubquantError(
                f"batch_size={batch_size} is not supported by the {MODEL_NAME} model; give a number"
            )
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_length = None if max_length is None else _positive_int("max_length", max_length)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = _optional_bool("add_bos_token", add_bos_token)
        self._prefix_token_id = (
            None if prefix_token_id is None else _token_id("prefix_token_id", prefix_token_id)
        )
        self.revision = revision
        if isinstance(pretrained, torch.nn.Module):  # a model loaded (and maybe quantized) already
            if not isinstance(tokenizer, Tokenizer):
                raise HubquantError(
                    "a loaded model is scored with its tokenizer: pass tokenizer=<the one load gave>"
                )
            if variant != "base":
                raise HubquantError("variant= applies when loading; a loaded model is scored as it is")
            report = getattr(pretrained, "quant_report", None)
            model = pretrained
            self.pretrained = str(getattr(pretrained, "name_or_path", type(pretrained).__name__))
            self.variant = report.method if report is not None else "base"
            self._device = model.device
        else:
            if tokenizer is not None:
                raise HubquantError("tokenizer= goes with a loaded model; from pretrained=, its own is used")
            self._dtype = torch_dtype(dtype)  # a bad dtype fails here, before anything is downloaded
            self._device = _resolve_device(device)
            self.pretrained, self.variant = str(pretrained), variant
            model, tokenizer = self._load(show=bool(_optional_bool("progress", progress)))
        self.model: Decoder = model
        self.tokenizer: Tokenizer = tokenizer  # type: ignore[assignment]
        # lm-eval's own check for a string that already starts with the prefix token
        self._prefix_text = tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

    def _load(self, show: bool) -> tuple[Decoder, Tokenizer]:
        """Load `pretrained` in `dtype` on the device, and quantize it to `variant`."""
        from hubquant.models.loading import load

        model, tokenizer = load(
            self.pretrained, revision=self.revision, dtype=self._dtype, device=self._device, progress=show
        )
        if tokenizer is None:
            raise HubquantError(f"{self.pretrained} ships no tokenizer.json, so lm-eval cannot feed it text")
        if self.variant != "base":
            quantize(model, self.variant, progress=show)
        return model, tokenizer

    # -- what lm-eval reads ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-text id: the tokenizer's first eos id."""
        if not self.tokenizer.eos_ids:
            raise HubquantError(
                f"{self.pretrained} declares no eos token, which lm-eval needs; add one to its config"
            )
        return self.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's first token) is scored after."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        if self.tokenizer.bos_id is not None:
            return self.tokenizer.bos_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        """The most tokens one forward pass sees."""
        return self._max_length or self.model.config.max_position

    @property
    def max_gen_toks(self) -> int:
        """Tokens `generate_until` produces when the task does not say."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request cache."""
        return self.pretrained.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes into its results' config: model, variant, dtype, parameters."""
        return {
            "model_source": self.pretrained,
            "model_revision": self.revision,
            "model_variant": self.variant,
            "model_dtype": str(self.model.dtype),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # -- tokens ------------------------------------------------------------------------------

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **_: Any,
    ) -> list[int]:
        """Token ids of `string`, with bos as the model expects it.

        Args:
            string: the text.
            add_special_tokens: None: bos as `add_bos_token` says (default: as the tokenizer does),
                and never a second one when the text already starts with the prefix token;
                True or False: add the special tokens, or not.
            left_truncate_len: keep only the last this many tokens.
        """
        if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
            add_special_tokens = False
        elif add_special_tokens is None:
            add_special_tokens = True
        if not add_special_tokens:
            ids = self.tokenizer.encode(string, add_special_tokens=False)
        elif self.add_bos_token is None:
            ids = self.tokenizer.encode(string, add_special_tokens=True)
        else:
            bos = [self.tokenizer.bos_id] if self.add_bos_token and self.tokenizer.bos_id is not None else []
            ids = bos + self.tokenizer.encode(string, add_special_tokens=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `tokens`.

        Args:
            tokens: token ids.
            skip_special_tokens: leave bos, eos, pad... out.
        """
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) of each continuation after its context.

        Args:
            requests: (strings for lm-eval's cache or None, context ids, continuation ids); the
                context holds at least one token.
            disable_tqdm: hide the progress bar.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first, as lm-eval's hf model: the first batch shows the worst memory and time.
        order = sorted(range(len(requests)), key=lambda i: self._sort_key(requests[i][1] + requests[i][2]))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation:
                    raise HubquantError("a loglikelihood request needs context and continuation tokens")
                if len(continuation) > self.max_length:
                    raise HubquantError(
                        f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}"
                    )
                # The model reads everything but the last token, cut from the left to max_length.
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
            ids, mask = self._pad(rows, side="right")
            with torch.inference_mode():
                logits = self.model(ids, mask if not bool(mask.all()) else None)
                for i, row, scores in zip(chunk, rows, logits, strict=True):
                    strings, _, continuation = requests[i]
                    n = len(continuation)
                    # logits at position p predict token p + 1: the continuation's are the last n
                    logprobs = torch.log_softmax(scores[len(row) - n : len(row)].float(), dim=-1)
                    target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                    total = logprobs.gather(-1, target[:, None]).sum()
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results[i] = (float(total), greedy)
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text (for perplexity): every token scored once, in
        lm-eval's disjoint rolling windows of `max_length` tokens, the first after the prefix token.

        Args:
            requests: instances whose `args` are `(text,)`.
            disable_tqdm: hide the progress bar.
        """
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence, eos, or the token limit.

        Args:
            requests: instances whose `args` are `(context, generation settings)`; the settings
                take `until`, `max_gen_toks` (or `max_new_tokens`...), `do_sample`, `temperature`,
                `top_k`, `top_p`.
            disable_tqdm: hide the progress bar.
        """
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        encoded = [self.tok_encode(request.args[0]) for request in requests]
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for members in groups.values():
            settings = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_new = int(settings.pop("max_gen_toks"))
            unknown = sorted(set(settings) - set(_GEN_SETTINGS))
            if unknown:
                raise HubquantError(
                    f"generation setting(s) {', '.join(unknown)} are not supported by the {MODEL_NAME} "
                    f"model; it takes until, max_gen_toks, {', '.join(_GEN_SETTINGS)}"
                )
            max_context = self.max_length - max_new
            if max_context < 1:
                raise HubquantError(
                    f"max_gen_toks={max_new} leaves no room for the prompt in max_length={self.max_length}"
                )
            members.sort(key=lambda i: (-len(encoded[i]), requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [encoded[i][-max_context:] for i in chunk]
                new_tokens = self._generate(prompts, max_new, until, settings)
                for i, tokens in zip(chunk, new_tokens, strict=True):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate(
        self, prompts: list[list[int]], max_new: int, until: list[str], settings: dict[str, Any]
    ) -> list[list[int]]:
        """New tokens for each prompt, up to eos (excluded) or until its text holds a stop sequence."""
        do_sample = bool(settings.get("do_sample", False))
        temperature = float(settings.get("temperature") or 1.0)
        top_k = settings.get("top_k")
        top_p = settings.get("top_p")
        ids, mask = self._pad(prompts, side="left")
        batch = len(prompts)
        eos = torch.tensor(self.tokenizer.eos_ids, dtype=torch.long, device=self.device)
        stops = [s for s in until if s]
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        cache = KVCache(self.model.config, batch, ids.shape[1] + max_new, self.model.dtype, self.device)
        with torch.inference_mode():
            logits = self.model(ids, mask if not bool(mask.all()) else None, cache, last_only=True)[:, -1]
            for step in range(max_new):
                if do_sample:
                    scores = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                    tokens = torch.multinomial(scores.softmax(-1), 1).squeeze(-1)
                else:
                    tokens = logits.argmax(-1)
                finished = torch.isin(tokens, eos).tolist()
                for row, token in enumerate(tokens.tolist()):
                    if done[row]:
                        continue
                    if finished[row]:
                        done[row] = True
                        continue
                    new[row].append(token)
                    if stops:
                        text = self.tok_decode(new[row])
                        done[row] = any(stop in text for stop in stops)
                if all(done) or step + 1 == max_new:
                    break
                logits = self.model(tokens[:, None], None, cache, last_only=True)[:, -1]
        return new

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _sort_key(tokens: list[int]) -> tuple[int, tuple[int, ...]]:
        return -len(tokens), tuple(tokens)

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` as one `[batch, longest]` id tensor and its attention mask, padded on `side`."""
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.eot_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- construction from lm-eval's strings -------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HubquantLM:
        """The model from lm-eval's "key=value,..." model args; those win over the harness's own
        `batch_size` and `device` (lm-eval's command line always passes a device).

        Args:
            arg_string: the model args.
            additional_config: the harness's `batch_size`, `max_batch_size`, `device`.
        """

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> HubquantLM:
        """The model from lm-eval's model args as a dict; those win over the harness's own.

        Args:
            arg_dict: the model args.
            additional_config: the harness's `batch_size`, `max_batch_size`, `device`.
        """
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**harness, **arg_dict})


def check_tasks(tasks: Sequence[str], task_manager: Any = None) -> None:
    """Refuse task names lm-eval does not know, before any model is loaded.

    Args:
        tasks: lm-eval task, group or tag names (globs allowed), or paths to task YAML files.
        task_manager: an `lm_eval.tasks.TaskManager` (default: lm-eval's own tasks).

    Raises:
        HubquantError: naming the unknown ones.
    """

    manager = task_manager if task_manager is not None else TaskManager()
    unknown = [t for t in tasks if not Path(t).is_file() and not manager.match_tasks([t])]
    if unknown:
        raise HubquantError(
            f"lm-eval task(s) {', '.join(unknown)} unknown; `python -m hubquant.evaluate.lm_eval ls tasks` "
            "lists the known ones"
        )


def run_tasks(
    model: Decoder,
    tasks: Sequence[str],
    tokenizer: Tokenizer | None = None,
    *,
    batch_size: int = 1,
    max_length: int | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    task_manager: Any = None,
    bootstrap_iters: int = 100000,
) -> dict[str, dict[str, float]]:
    """Score a loaded model (a variant or the base) on lm-eval tasks, as `simple_evaluate` does.

    Args:
        model: the decoder `hubquant.load` gave, quantized or not.
        tasks: lm-eval task, group or tag names.
        tokenizer: the tokenizer `hubquant.load` gave with it (required).
        batch_size: requests per forward pass.
        max_length: the most tokens one forward pass sees (default: the model's context length).
        limit: documents per task (a fraction when below 1), for a quick look.
        num_fewshot: few-shot examples per prompt (default: each task's own).
        task_manager: an `lm_eval.tasks.TaskManager` (default: lm-eval's own tasks).
        bootstrap_iters: bootstrap resamples for the standard errors lm-eval cannot compute in
            closed form (0: none).

    Returns:
        task -> lm-eval's metric -> value, numbers only: `{"arc_easy": {"acc,none": 0.41,
        "acc_stderr,none": 0.01, ...}}`; the tasks asked for when lm-eval reports each of them
        (a group's aggregate), else every task it ran.
    """

    if tokenizer is None:
        raise HubquantError("run_tasks needs the model's tokenizer: run_tasks(model, tasks, tokenizer)")
    lm = HubquantLM(model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=task_manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    table: dict[str, dict[str, Any]] = results["results"] if results else {}
    chosen = table if not all(t in table for t in tasks) else {t: table[t] for t in tasks}
    return {
        task: {
            key: float(value)
            for key, value in metrics.items()
            if "," in key and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        for task, metrics in chosen.items()
    }


def register() -> None:
    """Register `HubquantLM` as lm-eval's model "hubquant" (idempotent).

    `import hubquant` has already entered it as a lazy placeholder naming this class; this swaps
    in the class itself, and covers a registry that was somehow left without the placeholder.
    """

    model_registry.register(MODEL_NAME, target=HubquantLM)


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line, with "hubquant" registered; a `HubquantError` prints as one line.

    Args:
        argv: the arguments (default: `sys.argv[1:]`); lm-eval's parser reads `sys.argv`.

    Returns:
        0 on success, 1 on a hubquant error (argparse exits with its own status).
    """

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        lm_eval_cli.cli_evaluate()  # looked up at call time (tests cut it short)
    except HubquantError as error:
        print(f"hubquant: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script this file is `__main__`, and its classes are not the ones lm-eval's registry
    # names: run the module under its own name instead, which registers its class.
    from hubquant.evaluate.lm_eval import main as _main

    sys.exit(_main())
else:
    register()
