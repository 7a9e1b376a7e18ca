"""The canonical decoder's configuration: one typed field per architectural quirk.

A family never appears here by name. Each family's `from_hf_config()` (see `families.py`) reads
`config.json` and sets these fields; the decoder only ever looks at the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from hubquant.errors import HubquantError

if TYPE_CHECKING:
    import torch

# The one rule for dtype names, used by `load`, `convert` and the CLI. This module imports torch
# only inside `torch_dtype`: the CLI reads DTYPE_NAMES for `--dtype` before torch is needed.
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # what the CLI offers and messages suggest
# Every accepted spelling -> torch's own name (also what config.json's "torch_dtype" holds).
DTYPES: dict[str, str] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for "bf16" / "fp16" / "fp32" (or "bfloat16" / "float16" / "float32", or one
    of those torch dtypes given as is).

    Args:
        dtype: the dtype's name, or a torch dtype.

    Raises:
        HubquantError: for anything else, naming the value and the accepted ones.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = DTYPES.get(dtype.strip().lower().removeprefix("torch."))
        if name is not None:
            return getattr(torch, name)
    raise HubquantError(
        f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_NAMES)} "
        "(or bfloat16, float16, float32, or that torch dtype)"
    )


Norm = Literal["rms", "layer"]
Activation = Literal["silu", "gelu", "gelu_tanh", "gelu_new", "xielu", "relu"]
RopeType = Literal["default", "linear", "dynamic", "llama3"]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (rotate-half layout, as in HF checkpoints).

    Attributes:
        theta: base of the frequencies.
        type: "default", "linear" (positions / factor), "dynamic" (NTK base growth past
            `original_max_position`) or "llama3" (wavelength bands).
        factor: scaling factor of linear, dynamic and llama3.
        low_freq_factor / high_freq_factor: llama3 band edges.
        original_max_position: context length the frequencies were trained for.
    """

    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 2048


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, as explicit fields.

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_layers: sizes.
        num_heads, num_kv_heads, head_dim: attention shape; `head_dim` need not equal
            hidden_size / num_heads (Gemma).
        norm: "rms" (RMSNorm) or "layer" (LayerNorm with bias).
        norm_eps: epsilon of every norm.
        norm_unit_offset: RMSNorm multiplies by (1 + weight), computed in fp32 (Gemma).
        mlp: "gated" (act(gate) * up -> down) or "plain" (act(up) -> down).
        act: activation of the MLP; "xielu" has per-layer learned parameters.
        parallel_residual: attention and MLP both read one norm's output and are added to the
            residual together (Phi); otherwise each has its own pre-norm.
        rotary_fraction: share of each head's dims that is rotated (Phi's partial_rotary_factor).
        qk_norm: norm applied per head to queries and keys before RoPE, or None.
        embedding_scale: embeddings are multiplied by this, rounded to the model dtype (Gemma).
        tie_embeddings: the output head shares the embedding matrix.
        attn_bias: q/k/v projections carry a bias; `attn_out_bias` the output projection.
        mlp_bias: MLP projections carry biases; `head_bias` the output head.
        max_position: the context length the checkpoint declares.
        rope: rotary settings.
        bos_token_id / eos_token_ids / pad_token_id: from config.json and generation_config.json.
        kind: "decoder" (causal LM, RoPE, pre-norm: `Decoder`) or "encoder" (bidirectional,
            absolute positions, post-norm: `Encoder`).
        type_vocab_size: encoder only: rows of the token-type (segment) embedding.
        pooler / mlm_head / nsp_head: encoder only: which heads the checkpoint carries (BERT's
            tanh pooler; masked-LM head; next-sentence head).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: Norm = "rms"
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    mlp: Literal["gated", "plain"] = "gated"
    act: Activation = "silu"
    parallel_residual: bool = False
    rotary_fraction: float = 1.0
    qk_norm: Norm | None = None
    embedding_scale: float | None = None
    tie_embeddings: bool = False
    attn_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    head_bias: bool = False
    max_position: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    kind: Literal["decoder", "encoder"] = "decoder"
    type_vocab_size: int = 0
    pooler: bool = False
    mlm_head: bool = False
    nsp_head: bool = False

    def __post_init__(self) -> None:
        # These come straight from config.json, so the messages name its keys, not our fields.
        if self.num_heads < 1 or self.num_kv_heads < 1:
            raise HubquantError(
                f"config.json gives num_attention_heads={self.num_heads} and "
                f"num_key_value_heads={self.num_kv_heads}; both must be at least 1: fix config.json"
            )
        if self.num_heads % self.num_kv_heads:
            raise HubquantError(
                f"config.json's num_attention_heads ({self.num_heads}) is not a multiple of its "
                f"num_key_value_heads ({self.num_kv_heads}): each key/value head serves a whole group "
                "of query heads; fix one of the two in config.json"
            )
        if self.rotary_dims % 2:
            raise HubquantError(
                f"RoPE would rotate {self.rotary_dims} dims per head (head_dim {self.head_dim} x "
                f"partial_rotary_factor {self.rotary_fraction}), an odd number, but it rotates pairs; "
                "fix head_dim (or hidden_size / num_attention_heads) or partial_rotary_factor in config.json"
            )

    @property
    def rotary_dims(self) -> int:
        """Dims of each head that RoPE rotates (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.rotary_fraction)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["rope"] = RopeConfig(**data.get("rope", {}))
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)
