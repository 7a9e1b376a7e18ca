"""A tokenizer from the checkpoint's own `tokenizer.json`, with its special-token settings.

bos/eos/pad come from `tokenizer_config.json` (token strings) with `config.json` /
`generation_config.json` ids as fallback. Whether bos is prepended: `add_bos_token` in
`tokenizer_config.json` when it is set, otherwise whatever `tokenizer.json`'s post-processor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hubquant.errors import HubquantError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode with the checkpoint's special-token conventions.

    Attributes:
        bos_id, eos_ids, pad_id: special ids (eos may be several: generation stops on any).
        add_bos / add_eos: whether `encode(..., add_special_tokens=True)` adds them.
        chat_template: the checkpoint's Jinja chat template, if any.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id, self.eos_ids, self.pad_id = bos_id, tuple(eos_ids), pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        probe = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        # What the post-processor itself adds, so we neither double nor drop bos/eos.
        self._post_bos = bos_id is not None and len(probe) > len(plain) and probe[0] == bos_id
        self._post_eos = len(probe) > len(plain) and probe[-1] in self.eos_ids

    @classmethod
    def from_folder(
        cls, folder: Path, model_config: dict[str, Any], generation_config: dict[str, Any]
    ) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        from .checkpoint import read_json

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise HubquantError(
                f"{folder} has no tokenizer.json; only fast (tokenizers) tokenizers are supported"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:
            raise HubquantError(f"{path} cannot be read by tokenizers ({error}); re-download it") from None
        tk_config = (
            read_json(folder / "tokenizer_config.json", "")
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )

        def special(name: str, fallback: Any) -> int | None:
            text = _token_text(tk_config.get(f"{name}_token"))
            token_id = backend.token_to_id(text) if text else None
            if token_id is None and isinstance(fallback, list):
                fallback = fallback[0] if fallback else None
            return token_id if token_id is not None else fallback

        eos_ids: list[int] = []
        for source in (
            generation_config.get("eos_token_id"),
            special("eos", None),
            model_config.get("eos_token_id"),
        ):
            for token_id in source if isinstance(source, list) else [source]:
                if token_id is not None and token_id not in eos_ids:
                    eos_ids.append(int(token_id))
        bos_id = special("bos", generation_config.get("bos_token_id", model_config.get("bos_token_id")))
        tokenizer = cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=special("pad", generation_config.get("pad_token_id", model_config.get("pad_token_id"))),
            add_bos=False,
            chat_template=tk_config.get("chat_template") or _read_optional(folder / "chat_template.jinja"),
        )
        tokenizer.add_bos = bool(tk_config.get("add_bos_token", tokenizer._post_bos)) and bos_id is not None
        tokenizer.add_eos = bool(tk_config.get("add_eos_token", tokenizer._post_eos)) and bool(eos_ids)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens:
            return ids
        if self._post_bos and not self.add_bos:
            ids = ids[1:]
        elif self.add_bos and not self._post_bos:
            ids = [self.bos_id, *ids]
        if self._post_eos and not self.add_eos:
            ids = ids[:-1]
        elif self.add_eos and not self._post_eos:
            ids = [*ids, self.eos_ids[0]]
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, padding_side: str = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `(input_ids, attention_mask)` for several texts (left padding for generation)."""
        rows = [self.encode(t, add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        pad = self.pad_id if self.pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask


def _read_optional(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
