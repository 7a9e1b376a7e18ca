"""BERT encoders: `BertModel` (with its pooler; sentence embedders), `BertForMaskedLM`,
`BertForPreTraining` (masked-LM and next-sentence heads).

Hub names: the encoder's tensors sit at the top level in a `BertModel` checkpoint and under `bert.`
in a checkpoint with heads; transformers reads either into either, and so does this family. Old
TensorFlow-era checkpoints name LayerNorm parameters `gamma`/`beta` (read as weight/bias, as
transformers' "legacy" renaming does). What transformers ignores on purpose is dropped here on
purpose: the `position_ids` buffer and heads a class does not have (the pre-training heads of a
checkpoint loaded as `BertModel`). The MLM decoder's bias is tied to `cls.predictions.bias` exactly
when its weight is tied to the word embeddings (transformers 5; an untied checkpoint stores both
biases and uses the decoder's). No GGUF side: llama.cpp's `bert` is not read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from hubquant.errors import HubquantError

from ..config import ModelConfig
from .base import (
    Family,
    activation,
    bool_param,
    float_param,
    int_param,
    register,
    str_param,
    token_id_param,
    token_ids_param,
)

BERT_MODULES: dict[str, str | None] = {
    "embeddings.word_embeddings": "embed",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.token_type_embeddings": "type_embed",
    "embeddings.LayerNorm": "embed_norm",
    "encoder.layer.{}.attention.self.query": "layers.{}.attn.q",
    "encoder.layer.{}.attention.self.key": "layers.{}.attn.k",
    "encoder.layer.{}.attention.self.value": "layers.{}.attn.v",
    "encoder.layer.{}.attention.output.dense": "layers.{}.attn.o",
    "encoder.layer.{}.attention.output.LayerNorm": "layers.{}.attn_norm",
    "encoder.layer.{}.intermediate.dense": "layers.{}.mlp.up",
    "encoder.layer.{}.output.dense": "layers.{}.mlp.down",
    "encoder.layer.{}.output.LayerNorm": "layers.{}.mlp_norm",
    "pooler.dense": "pooler",
}
# The heads' Hub tensors by full name (they are never under `bert.`).
MLM_TENSORS = {
    "cls.predictions.transform.dense.weight": "mlm_transform.weight",
    "cls.predictions.transform.dense.bias": "mlm_transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
    "cls.predictions.decoder.weight": "lm_head.weight",  # absent when tied to the embeddings
    "cls.predictions.decoder.bias": "lm_head.bias",  # absent (or a copy) when tied to the next
    "cls.predictions.bias": "mlm_bias",
}
NSP_TENSORS = {"cls.seq_relationship.weight": "nsp.weight", "cls.seq_relationship.bias": "nsp.bias"}
# Stored by some writers, derived or duplicated here: never loaded.
ALWAYS_DROPPED = ("embeddings.position_ids", "embeddings.token_type_ids")
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}


class Bert(Family):
    """BERT: word + absolute position + token-type embeddings, post-norm blocks, GELU, biases."""

    name = "bert"
    model_type = "bert"
    modules = BERT_MODULES
    # transformers' BertConfig.
    defaults = {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "position_embedding_type": "absolute",
        "is_decoder": False,
    }
    base_prefix: ClassVar[str] = ""  # where this class writes the encoder's tensors
    pooler: ClassVar[bool] = True
    mlm: ClassVar[bool] = False
    nsp: ClassVar[bool] = False

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = cls.with_defaults(hf)
        hidden = int_param(hf, "hidden_size")
        heads = int_param(hf, "num_attention_heads")
        if hidden % heads:
            raise HubquantError(
                f"config.json's hidden_size ({hidden}) is not a multiple of its num_attention_heads "
                f"({heads}); fix one of the two in config.json"
            )
        position = str_param(hf, "position_embedding_type")
        if position != "absolute":
            raise HubquantError(
                f"position_embedding_type {position[:40]!r} is not supported; "
                "only 'absolute' BERT checkpoints are read"
            )
        if bool_param(hf, "is_decoder"):
            raise HubquantError(
                "config.json sets is_decoder: true (BERT as a causal decoder), which is not supported; "
                "load it as the encoder it was trained as (is_decoder: false)"
            )
        return ModelConfig(
            vocab_size=int_param(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=int_param(hf, "intermediate_size"),
            num_layers=int_param(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            norm="layer",
            norm_eps=float_param(hf, "layer_norm_eps", low=0.0),
            mlp="plain",
            act=activation(str_param(hf, "hidden_act")),
            rotary_fraction=0.0,
            tie_embeddings=cls.tied(hf),
            attn_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            head_bias=cls.mlm,
            max_position=int_param(hf, "max_position_embeddings"),
            bos_token_id=token_id_param(hf, "bos_token_id"),
            eos_token_ids=token_ids_param(hf, "eos_token_id"),
            pad_token_id=token_id_param(hf, "pad_token_id"),
            kind="encoder",
            type_vocab_size=int_param(hf, "type_vocab_size"),
            pooler=cls.pooler,
            mlm_head=cls.mlm,
            nsp_head=cls.nsp,
        )

    @classmethod
    def adapt(cls, cfg: ModelConfig, hub_names: set[str]) -> ModelConfig:
        """A `BertModel` saved without its pooler (`add_pooling_layer=False`) is built without one,
        rather than with a random one as transformers does."""

        if cls.pooler and not cls.nsp and not any(n.endswith("pooler.dense.weight") for n in hub_names):
            return dataclasses.replace(cfg, pooler=False)
        return cfg

    @classmethod
    def _heads(cls) -> dict[str, str]:
        return {**(MLM_TENSORS if cls.mlm else {}), **(NSP_TENSORS if cls.nsp else {})}

    @classmethod
    def to_canonical(cls, hub_name: str) -> tuple[bool, str | None]:
        module, _, leaf = hub_name.rpartition(".")
        if module.endswith("LayerNorm") and leaf in _LEGACY_LEAVES:
            hub_name = f"{module}.{_LEGACY_LEAVES[leaf]}"
        name = hub_name.removeprefix("bert.")
        if name in ALWAYS_DROPPED:
            return True, None
        if name.startswith("cls."):
            heads = cls._heads()
            if name in heads:
                return True, heads[name]
            # A head this class does not have (the pre-training heads of a checkpoint read as
            # BertModel): transformers leaves it out too. Unknown cls.* names stay errors.
            return (name in MLM_TENSORS or name in NSP_TENSORS), None
        if name.startswith("pooler.") and not cls.pooler:
            return True, None  # BertForMaskedLM has no pooler; pre-training checkpoints carry one
        return cls._lookup(cls.modules, name)

    @classmethod
    def to_hub(cls, canonical_name: str) -> str:
        for hub, canonical in cls._heads().items():
            if canonical == canonical_name:
                return hub
        if canonical_name.split(".")[0] in ("lm_head", "mlm_bias", "mlm_transform", "mlm_norm", "nsp"):
            raise KeyError(canonical_name)  # a head this class does not have
        return cls.base_prefix + super().to_hub(canonical_name)


@register("BertModel")
class BertModel(Bert):
    """The bare encoder with its pooler (sentence embedders such as all-MiniLM-L6-v2)."""


@register("BertForMaskedLM")
class BertForMaskedLM(Bert):
    """Encoder and masked-LM head (no pooler)."""

    base_prefix = "bert."
    pooler = False
    mlm = True


@register("BertForPreTraining")
class BertForPreTraining(Bert):
    """Encoder, pooler, masked-LM and next-sentence heads."""

    base_prefix = "bert."
    mlm = True
    nsp = True
