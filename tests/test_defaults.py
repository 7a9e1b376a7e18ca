"""A config.json that leaves keys at their defaults gives the model transformers gives.

For every family: a tiny model whose settings are, wherever the size allows, its transformers config
class's defaults (Gemma's fixed head_dim 256 and 16 kv heads, Phi's partial rotary 0.5, Apertus'
xIELU, eps 1e-5 and llama3 RoPE with theta 12e6...). It is saved by transformers, every key that
the class would restore by itself is then removed from config.json, and hubquant must load the
trimmed folder with the logits transformers loads it with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb_, sample_ids

import hubquant
from hubquant.models.families import family_for

pytestmark = pytest.mark.filterwarnings("ignore")

SIZES = dict(vocab_size=160, intermediate_size=64, num_hidden_layers=2)
# name -> (config class, the sizes set; everything else at the class default)
CASES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, num_attention_heads=4)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, num_attention_heads=16)),  # 16 kv heads, head_dim 256
    "phi": ("PhiConfig", dict(hidden_size=64, num_attention_heads=4)),  # partial rotary 0.5
    "apertus": ("ApertusConfig", dict(hidden_size=32, num_attention_heads=4)),  # llama3, theta 12e6
}
# Keys that must be among those removed, so the test exercises each family's own defaults.
MUST_REMOVE = {
    "llama": {"rms_norm_eps", "hidden_act", "head_dim", "num_key_value_heads", "rope_parameters"},
    "gemma": {"head_dim", "num_key_value_heads", "hidden_act", "tie_word_embeddings", "rope_parameters"},
    "phi": {"rope_parameters", "layer_norm_eps", "hidden_act", "qk_layernorm"},
    "apertus": {"rope_parameters", "rms_norm_eps", "hidden_act", "pad_token_id"},
}
_BOOKKEEPING = {"transformers_version", "architectures", "model_type", "dtype", "torch_dtype"}


def _class_restores(config_cls: type, full: dict, key: str) -> bool:
    """Whether the config class, given `full` without `key`, restores exactly what `full` says."""
    trimmed = {k: v for k, v in full.items() if k != key}
    want = {k: v for k, v in config_cls(**full).to_dict().items() if k not in _BOOKKEEPING}
    got = {k: v for k, v in config_cls(**trimmed).to_dict().items() if k not in _BOOKKEEPING}
    return got == want


@pytest.fixture(scope="module", params=list(CASES))
def trimmed(request, tmp_path_factory) -> tuple[str, Path, set[str]]:
    import transformers

    case = request.param
    cls_name, sizes = CASES[case]
    config_cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**SIZES, **sizes), dtype=torch.float32)
    perturb_(model)
    folder = tmp_path_factory.mktemp(f"defaults-{case}")
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)  # config.json alone speaks
    full = json.loads((folder / "config.json").read_text())
    removed = set()
    for key in list(full):
        if key not in _BOOKKEEPING and _class_restores(config_cls, full, key):
            removed.add(key)
            del full[key]
    (folder / "config.json").write_text(json.dumps(full, indent=2))
    return case, folder, removed


def test_trimming_removes_the_family_defaults(trimmed):
    case, _, removed = trimmed
    assert MUST_REMOVE[case] <= removed, MUST_REMOVE[case] - removed


def test_trimmed_config_loads_with_transformers_logits(trimmed):
    import transformers

    case, folder, _ = trimmed
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, _ = hubquant.load(folder, dtype=torch.float32, progress=False)
    ids = sample_ids(batch=2, seq=24)
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids)
    assert (got - want).abs().max().item() <= 1e-4
    config = reference.config
    assert model.config.eos_token_ids == (config.eos_token_id,)
    assert (model.config.bos_token_id, model.config.pad_token_id) == (
        config.bos_token_id,
        config.pad_token_id,
    )
    assert model.config.tie_embeddings == config.tie_word_embeddings


def test_trimmed_and_full_configs_give_one_model_config(trimmed):
    """The same ModelConfig whether a default is written out or left to the family."""
    import transformers

    _, folder, _ = trimmed
    trimmed_config = json.loads((folder / "config.json").read_text())
    full = transformers.AutoConfig.from_pretrained(folder).to_dict()
    family = family_for(trimmed_config)
    assert family.config(trimmed_config) == family.config(full)


def test_null_tie_word_embeddings_means_the_family_default():
    """One tie rule for load and convert: null is the family's default, as if the key were absent."""
    gemma = family_for({"architectures": ["GemmaForCausalLM"]})
    llama = family_for({"architectures": ["LlamaForCausalLM"]})
    assert gemma.tied({"tie_word_embeddings": None}) and not llama.tied({"tie_word_embeddings": None})
    assert not gemma.tied({"tie_word_embeddings": False}) and llama.tied({"tie_word_embeddings": True})
