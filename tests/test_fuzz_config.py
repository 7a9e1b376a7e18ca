"""Fuzz: config.json mutated key by key, for every family. Each config either becomes a valid
`ModelConfig` through `family_for(cfg).config(cfg)` or is refused with one line that names the key
at fault; nothing else (no TypeError, no ValueError, no multi-line message).

The valid starting points are the tiny configs of `conftest.CASES` / `BERT_CASES` as transformers'
config classes write them (`to_dict`), plus trimmed ones that leave most keys to the family's
defaults. Each key a family reads (and each key of the RoPE dict) is set to values of the wrong
type, absurd values (zero, negative, huge, NaN, infinite, non-integer) and deleted; then random
combinations of two or three such changes.

Targeted tests: `"hidden_size": "x"` names hidden_size; head counts that do not divide; negative
layers; a tokenizer producing ids the embedding lacks, refused by `hubquant.load` before any weight
is read; wrong types in generation_config.json and tokenizer_config.json.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BASE, BERT_BASE, BERT_CASES, CASES, write_wordpiece_tokenizer

import hubquant
from hubquant.errors import HubquantError
from hubquant.models.config import ModelConfig
from hubquant.models.families import family_for
from hubquant.models.families.base import LIMITS

pytestmark = pytest.mark.filterwarnings("ignore")

SEED = 7
RANDOM_COMBINATIONS = 1500
BUILD_EVERY = 25  # build one accepted config in this many on the meta device

# Every key some family reads from config.json, and the keys of a RoPE dict.
KEYS = [
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "rms_norm_eps", "layer_norm_eps",
    "attention_bias", "mlp_bias", "qk_layernorm", "position_embedding_type", "is_decoder",
    "type_vocab_size", "n_embd", "n_head",
]  # fmt: skip
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta", "partial_rotary_factor"]  # fmt: skip
DELETE = object()
VALUES: list[Any] = [
    DELETE, None, "x", "", "32", "silu", True, False, [], [4], {}, {"a": 1}, 0, -1, -32, 1, 2, 3, 5, 7,
    0.5, 1.5, 32.0, -0.0, 1e-12, float("nan"), float("inf"), -float("inf"), 2**31, 2**40, 2**63, 10**30,
    1e300, "linear", "llama3", "dynamic", "default", "yarn",
]  # fmt: skip
_ARCH = {"LlamaConfig": "LlamaForCausalLM", "GemmaConfig": "GemmaForCausalLM", "PhiConfig": "PhiForCausalLM",
         "ApertusConfig": "ApertusForCausalLM"}  # fmt: skip


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def base_configs() -> dict[str, dict[str, Any]]:
    """name -> a valid config.json: conftest's tiny cases as transformers writes them, and trimmed ones."""
    import transformers

    out = {}
    for case, (cls_name, overrides) in CASES.items():
        config = getattr(transformers, cls_name)(**{**BASE, **overrides}).to_dict()
        out[case] = _jsonable({**config, "architectures": [_ARCH[cls_name]]})
        out[f"{case}-trimmed"] = {"architectures": [_ARCH[cls_name]], **BASE, **_jsonable(overrides)}
    for case, (cls_name, overrides) in BERT_CASES.items():
        config = transformers.BertConfig(**{**BERT_BASE, **overrides}).to_dict()
        out[case] = _jsonable({**config, "architectures": [cls_name]})
    return out


def _set(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = config
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = copy.deepcopy(value)


def mutation_paths(config: dict[str, Any]) -> list[tuple[str, ...]]:
    paths = [(key,) for key in KEYS]
    for rope in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(rope), dict):
            paths += [(rope, key) for key in ROPE_KEYS]
    return paths


def run(config: dict[str, Any]) -> ModelConfig | str:
    """The ModelConfig, or the one-line message; any other outcome fails the test."""
    try:
        return family_for(config).config(config)
    except HubquantError as error:
        message = str(error)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return message


def check_valid(cfg: ModelConfig) -> None:
    """An accepted config is one the model can be built from, every field of its type and range."""
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "max_position", "type_vocab_size")  # fmt: skip
    for name in ints:
        value = getattr(cfg, name)
        assert type(value) is int, (name, value)
    for name, limit in [("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                        ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
                        ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                        ("head_dim", "head_dim"), ("max_position", "max_position_embeddings")]:  # fmt: skip
        low, high = LIMITS[limit]
        assert low <= getattr(cfg, name) <= high, (name, getattr(cfg, name))
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.rotary_dims % 2 == 0
    assert cfg.kind == "encoder" or 0 < cfg.rotary_fraction <= 1
    for value in (cfg.norm_eps, cfg.rope.theta, cfg.rope.factor, cfg.rotary_fraction):
        assert type(value) is float and math.isfinite(value), value
    assert cfg.norm_eps >= 0 and cfg.rope.theta > 0 and cfg.rope.factor > 0
    assert type(cfg.rope.original_max_position) is int and cfg.rope.original_max_position >= 1
    assert all(type(i) is int for i in cfg.eos_token_ids)
    assert all(i is None or type(i) is int for i in (cfg.bos_token_id, cfg.pad_token_id))
    for flag in (
        "tie_embeddings",
        "attn_bias",
        "attn_out_bias",
        "mlp_bias",
        "head_bias",
        "parallel_residual",
    ):
        assert type(getattr(cfg, flag)) is bool, flag


def build(cfg: ModelConfig) -> None:
    from hubquant.models.encoder import build_model

    with torch.device("meta"):
        build_model(cfg)


def names_culprit(message: str, path: tuple[str, ...]) -> bool:
    """The message names the key changed (for the RoPE dict: its key, or the dict)."""
    key = path[-1]
    aliases = {"type": "rope_type", "n_embd": "hidden_size", "n_head": "num_attention_heads"}
    return any(word in message for word in {key, aliases.get(key, key), *path[:-1]})


def test_fuzz_mutated_configs() -> None:
    rng = random.Random(SEED)
    bases = base_configs()
    counts: Counter[str] = Counter()
    wrong_culprit: list[str] = []
    built = 0
    start = time.perf_counter()
    cases: list[tuple[dict[str, Any], list[tuple[str, ...]]]] = []
    for base in bases.values():
        for path in mutation_paths(base):
            for value in VALUES:
                config = copy.deepcopy(base)
                _set(config, path, value)
                cases.append((config, [path]))
    names = list(bases)
    for _ in range(RANDOM_COMBINATIONS):
        base = bases[rng.choice(names)]
        config = copy.deepcopy(base)
        paths = rng.sample(mutation_paths(base), rng.randint(2, 3))
        for path in paths:
            if all(isinstance(config.get(p), dict) for p in path[:-1]):
                _set(config, path, rng.choice(VALUES))
        cases.append((config, paths))
    for config, paths in cases:
        result = run(config)
        if isinstance(result, str):
            counts["refused"] += 1
            if len(paths) == 1 and not names_culprit(result, paths[0]):
                wrong_culprit.append(f"{'.'.join(paths[0])}: {result}")
        else:
            counts["accepted"] += 1
            check_valid(result)
            if (
                counts["accepted"] % BUILD_EVERY == 0
                and result.num_layers <= 4
                and result.vocab_size <= 1 << 16
            ):
                build(result)
                built += 1
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    summary = (
        f"{total} mutated configs over {len(bases)} bases (llama, gemma, phi, apertus, bert) in {elapsed:.1f} s: "
        f"{counts['accepted']} valid ModelConfigs ({built} built on meta), {counts['refused']} one-line "
        f"refusals, 0 other outcomes, {len(wrong_culprit)} refusals naming another key"
    )
    print(summary)
    assert not wrong_culprit, f"{summary}; e.g. {wrong_culprit[:5]}"
    assert total >= 1000, summary
    assert counts["accepted"] > total // 10 and counts["refused"] > total // 3, summary


# ----------------------------------------------------------------------------------------------------
# Targeted


def _llama() -> dict[str, Any]:
    return base_configs()["llama_gqa"]


def _refusal(config: dict[str, Any]) -> str:
    result = run(config)
    assert isinstance(result, str), f"accepted: {result}"
    return result


def test_string_hidden_size_names_hidden_size() -> None:
    for base in base_configs().values():
        message = _refusal({**base, "hidden_size": "x"})
        assert message.startswith("config.json's hidden_size is 'x' (str)"), message
        assert "num_attention_heads" not in message


def test_head_counts_that_do_not_divide() -> None:
    message = _refusal({**_llama(), "num_key_value_heads": 3})
    assert "num_attention_heads (4)" in message and "num_key_value_heads (3)" in message
    trimmed = base_configs()["llama_gqa-trimmed"]
    message = _refusal({**trimmed, "hidden_size": 30})  # no head_dim: it would be 30 / 4
    assert "hidden_size (30)" in message and "num_attention_heads (4)" in message
    bert = base_configs()["bert_model"]
    assert "hidden_size (32)" in _refusal({**bert, "num_attention_heads": 5})


@pytest.mark.parametrize("value", [-2, 0, 2.5, "2", True, None, 10**9])
def test_bad_layer_counts(value: Any) -> None:
    config = {**_llama(), "num_hidden_layers": value}
    if value is None:  # null means "the family's default", as in transformers
        assert run(config).num_layers == 32
        return
    message = _refusal(config)
    assert message.startswith("config.json's num_hidden_layers is"), message


def test_nan_and_huge_values_named() -> None:
    assert "rms_norm_eps" in _refusal({**_llama(), "rms_norm_eps": float("nan")})
    assert "vocab_size" in _refusal({**_llama(), "vocab_size": 10**30})
    assert "tie_word_embeddings" in _refusal({**_llama(), "tie_word_embeddings": "false"})
    message = _refusal({**_llama(), "rope_parameters": {"rope_type": "linear", "factor": "2"}})
    assert "rope_parameters.factor" in message, message
    assert "architectures" in _refusal({**_llama(), "architectures": "LlamaForCausalLM"})


# -- at load time, before any weight is read -----------------------------------------------------


def _folder(tmp_path: Path, config: dict[str, Any]) -> Path:
    """config.json, a WordPiece tokenizer.json (ids up to ~100) and a model.safetensors that is not
    one: any attempt to read weights would fail with a different message."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_wordpiece_tokenizer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    return tmp_path


def _load_error(folder: Path) -> str:
    with pytest.raises(HubquantError) as info:
        hubquant.load(folder, dtype=torch.float32, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", ["llama_gqa-trimmed", "bert_model"])
def test_tokenizer_ids_beyond_vocab_refused_before_weights(tmp_path: Path, case: str) -> None:
    config = {**base_configs()[case], "vocab_size": 40}
    message = _load_error(_folder(tmp_path, config))
    assert "tokenizer.json" in message and "vocab_size is 40" in message, message


def test_load_refuses_bad_config_before_weights(tmp_path: Path) -> None:
    config = {**base_configs()["llama_gqa-trimmed"], "hidden_size": "x"}
    assert "hidden_size is 'x'" in _load_error(_folder(tmp_path, config))


@pytest.mark.parametrize(
    ("file", "content", "words"),
    [
        ("generation_config.json", {"eos_token_id": "x"}, ["generation_config.json", "eos_token_id"]),
        ("generation_config.json", [1, 2], ["generation_config.json", "list"]),
        ("tokenizer_config.json", {"clean_up_tokenization_spaces": "yes"}, ["clean_up_tokenization_spaces"]),
        ("tokenizer_config.json", {"chat_template": 5}, ["chat_template"]),
        ("config.json", "NaN", ["config.json", "float"]),
    ],
)
def test_wrong_types_in_other_files(tmp_path: Path, file: str, content: Any, words: list[str]) -> None:
    config = base_configs()["llama_gqa-trimmed"]
    folder = _folder(tmp_path, {**config, "vocab_size": 160})
    (folder / file).write_text(json.dumps(content) if file != "config.json" else content)
    message = _load_error(folder)
    for word in words:
        assert word in message, message
