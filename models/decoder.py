"""The one canonical decoder. Every family is a `ModelConfig`; nothing here knows family names.

The parts (attention, MLP, norms, rotary embeddings, the KV cache) are in `layers.py`. Canonical
parameter names (`layers.3.attn.q.weight`) are what the families map Hub names onto.
"""

from __future__ import annotations

import torch
from torch import nn

from hubquant.errors import HubquantError

from .config import ModelConfig
from .generate import generate
from .layers import Block, KVCache, make_norm, rope_inv_freq


class Decoder(nn.Module):
    """A decoder-only language model.

    Call it as `model(input_ids, attention_mask=None, cache=None)`; it returns logits
    `[batch, seq, vocab]` (or `[batch, 1, vocab]` with `last_only=True`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            layer.attn.layer_idx = i
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope_cache: dict[torch.device, torch.Tensor] = {}  # inverse frequencies per device

    def tie_weights(self) -> None:
        """Re-tie the head to the embeddings (loading replaces the embedding parameter)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Greedy or sampled continuation with a KV cache; see `hubquant.models.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def _inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        cfg = self.config
        # Only dynamic NTK depends on the length, and only beyond the trained context.
        if cfg.rope.type == "dynamic" and seq_len > cfg.max_position:
            # Grown frequencies change with every length: computed (cheaply), never cached.
            return rope_inv_freq(cfg.rope, cfg.rotary_dims, cfg.max_position, seq_len).to(device)
        if device not in self._rope_cache:
            inv = rope_inv_freq(cfg.rope, cfg.rotary_dims, cfg.max_position)
            self._rope_cache[device] = inv.to(device)
        return self._rope_cache[device]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables `[batch or 1, 1, seq, rotary_dims]` for integer `positions`."""
        if self.config.rope.type == "dynamic":
            # Each row grows its base from its own length, so padding never changes a row.
            lengths = (positions.max(-1).values + 1).tolist()
            inv_freq = torch.stack([self._inv_freq(n, positions.device) for n in lengths])[:, None]
        else:
            inv_freq = self._inv_freq(0, positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` `[batch, seq]`.

        Args:
            input_ids: token ids.
            attention_mask: 1 for real tokens, 0 for padding (left or right); None means all real.
                Positions count real tokens only, so a left-padded row equals its unpadded self.
            cache: a `KVCache` to read earlier steps from and append this step to.
            last_only: compute the head for the last position only (generation).
        """
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        real = None if attention_mask is None else attention_mask.to(torch.bool)
        if real is not None and bool(real.all()):
            real = None
        positions, mask = self._positions_and_mask(b, t, past, real, cache, input_ids.device)

        x = self.embed(input_ids)
        if self.config.embedding_scale is not None:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        rope = self._rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.length += t
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _positions_and_mask(
        self,
        b: int,
        t: int,
        past: int,
        real: torch.Tensor | None,
        cache: KVCache | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        steps = torch.arange(t, device=device)
        if cache is not None:
            if past + t > cache.max_len:
                raise HubquantError(
                    f"the KV cache holds {cache.max_len} tokens but this step needs {past + t}; "
                    f"allocate it longer: KVCache(..., max_len={past + t} or more), i.e. prompt plus "
                    "max_new_tokens"
                )
            cache.valid[:, past : past + t] = True if real is None else real
            cache.padded = cache.padded or real is not None
            count = steps[None].expand(b, t) + 1 if real is None else real.long().cumsum(-1)
            positions = (cache.next_pos[:, None] + count - 1).clamp_min(0)
            cache.next_pos += count[:, -1]
        elif real is None:
            positions = steps[None]
        else:
            positions = (real.long().cumsum(-1) - 1).clamp_min(0)

        padded = real is not None or (cache is not None and cache.padded)
        if not padded:
            if past == 0 or t == 1:
                return positions, None  # SDPA's own causal flag (or no mask at all) suffices
            keys = torch.arange(past + t, device=device)
            return positions, keys[None, :] <= (past + steps)[:, None]
        keys = torch.arange(past + t, device=device)
        key_real = cache.valid[:, : past + t] if cache is not None else real
        mask = (keys[None, :] <= (past + steps)[:, None])[None] & key_real[:, None, :]
        # A padding query may see no real key at all; let it see everything rather than
        # produce NaN. Its output is never used.
        mask = mask | ~mask.any(-1, keepdim=True)
        return positions, mask[:, None]
