"""The canonical encoder (BERT): bidirectional attention, absolute positions, post-norm blocks.

It is built from the decoder's own pieces where they are the same computation: `Attention` (q, k,
v, o as plain `nn.Linear`s, so every quantize method applies; no RoPE, no cache, not causal) and
the plain `MLP` (up -> GELU -> down, with biases). What differs is written here: the three summed
embeddings, the post-norm residual order, and the heads.

    embeddings:  x = LayerNorm((word + token_type) + position)
    each block:  x = attn_norm(attn(x) + x)
                 x = mlp_norm(mlp(x) + x)
    heads:       pooler     tanh(pooler(x[:, 0]))
                 mlm        lm_head(mlm_norm(act(mlm_transform(x))))   (when tied, lm_head's
                            weight is the word embeddings' and its bias is `mlm_bias`)
                 nsp        nsp(pooled)

Canonical names: `embed`, `pos_embed`, `type_embed`, `embed_norm`, `layers.N.attn.{q,k,v,o}`,
`layers.N.attn_norm`, `layers.N.mlp.{up,down}`, `layers.N.mlp_norm`, `pooler`, `mlm_transform`,
`mlm_norm`, `lm_head`, `mlm_bias`, `nsp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hubquant.errors import HubquantError

from .config import ModelConfig
from .decoder import Decoder
from .layers import _ACTIVATIONS, MLP, Attention


@dataclass
class EncoderOutput:
    """Everything an encoder computes for one batch; heads the checkpoint lacks are None."""

    hidden: torch.Tensor  # [batch, seq, hidden]: the last layer's output
    pooled: torch.Tensor | None = None  # [batch, hidden]: BERT's tanh pooler on the first token
    mlm_logits: torch.Tensor | None = None  # [batch, seq, vocab]
    nsp_logits: torch.Tensor | None = None  # [batch, 2]


class EncoderBlock(nn.Module):
    """One post-norm encoder layer (BERT's): each sub-layer's output is added, then normalised."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(self.attn(x, None, mask, None) + x)
        return self.mlp_norm(self.mlp(x) + x)


class Encoder(nn.Module):
    """A bidirectional encoder (BERT).

    Call it as `model(input_ids, attention_mask=None, token_type_ids=None)`: with a masked-LM head
    it returns the MLM logits `[batch, seq, vocab]` (as a decoder returns its logits), without one
    the last hidden state `[batch, seq, hidden]`. `outputs()` returns every head's result.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.kind != "encoder":
            raise HubquantError(f"Encoder needs an encoder config, got kind={cfg.kind!r}")
        d = cfg.hidden_size
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_position, d)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(d, d) if cfg.pooler or cfg.nsp_head else None
        self.mlm_transform = self.mlm_norm = self.lm_head = self.mlm_bias = None
        if cfg.mlm_head:
            # Registered before lm_head, so a tied bias is named (and loaded) as mlm_bias.
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
            self.mlm_transform = nn.Linear(d, d)
            self.mlm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(d, cfg.vocab_size, bias=True)
            self.tie_weights()
        self.nsp = nn.Linear(d, 2) if cfg.nsp_head else None
        self._act = _ACTIVATIONS[cfg.act]

    # Canonical names that are copies of others when the head is tied: a checkpoint may store them.
    tied_copies = ("lm_head.weight", "lm_head.bias")

    def tie_weights(self) -> None:
        """Re-tie the MLM decoder to the word embeddings and its bias to `mlm_bias`, as transformers
        ties them (loading replaces the parameters)."""
        if self.lm_head is not None and self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
            if isinstance(self.lm_head, nn.Linear):
                self.lm_head.bias = self.mlm_bias

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's output `[batch, seq, hidden]`.

        Args:
            input_ids: token ids `[batch, seq]`.
            attention_mask: 1 for real tokens, 0 for padding; None means all real. Padding keys
                are hidden from every query; padding positions' outputs are meaningless.
            token_type_ids: segment ids (0 or 1 for BERT); None means all 0.
        """
        b, t = input_ids.shape
        if t > self.config.max_position:
            raise HubquantError(
                f"input of {t} tokens is longer than the model's {self.config.max_position} positions; "
                f"truncate it to {self.config.max_position} tokens"
            )
        x = self.embed(input_ids)
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = x + self.pos_embed(torch.arange(t, device=input_ids.device))[None]
        x = self.embed_norm(x)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # [batch, 1, 1, keys]: a query sees every real key. A row with no real token at all
            # sees everything instead of producing NaN; its output is never meaningful.
            keys = attention_mask.to(torch.bool)
            keys = keys | ~keys.any(-1, keepdim=True)
            mask = keys[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh of the pooler applied to the first token `[batch, hidden]`."""
        if self.pooler is None:
            raise HubquantError("this checkpoint has no pooler layer (pooler.dense); use the hidden states")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits `[batch, seq, vocab]` from the hidden states."""
        if self.lm_head is None:
            raise HubquantError(
                "this encoder has no masked-LM head (a BertModel checkpoint); "
                "load a BertForMaskedLM or BertForPreTraining checkpoint for MLM logits"
            )
        return self.lm_head(self.mlm_norm(self._act(self.mlm_transform(hidden))))

    def outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """The hidden states and every head the checkpoint has (the others None)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        pooled = self.pool(hidden) if self.pooler is not None else None
        return EncoderOutput(
            hidden=hidden,
            pooled=pooled,
            mlm_logits=self.mlm_logits(hidden) if self.lm_head is not None else None,
            nsp_logits=self.nsp(pooled) if self.nsp is not None and pooled is not None else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits `[batch, seq, vocab]` with a masked-LM head, else the last hidden state."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return self.mlm_logits(hidden) if self.lm_head is not None else hidden


def build_model(cfg: ModelConfig) -> nn.Module:
    """The canonical model for a config: `Decoder` or `Encoder` (build it under `torch.device("meta")`
    to allocate nothing)."""
    if cfg.kind == "encoder":
        return Encoder(cfg)
    return Decoder(cfg)


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by canonical name (tied ones once)."""
    persistent = set(model.state_dict(keep_vars=True))
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in persistent)
    return tensors
