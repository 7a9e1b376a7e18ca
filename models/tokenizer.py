"""A tokenizer from the checkpoint's own `tokenizer.json`, with its special-token settings.

It behaves as transformers 5's `AutoTokenizer` does with the same folder:

- `tokenizer.json` decides what `encode(..., add_special_tokens=True)` adds: its post-processor.
  Like transformers, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` are not read
  when `tokenizer.json` exists (and hubquant always needs it). Truncation and padding stored in
  `tokenizer.json` are switched off, as transformers' `encode` does.
- bos/eos/pad are the token strings `tokenizer_config.json` names (merged with
  `special_tokens_map.json` when the config has no `added_tokens_decoder`, transformers' legacy
  rule), with `generation_config.json` / `config.json` ids as fallback.
- `decode` applies `clean_up_tokenization_spaces` when the config asks for it, except for BPE
  models, where transformers skips it too.

The stop set is one rule, `eos_token_ids`, shared with `load()`, so `model.generate`'s default
stop ids and `tokenizer.eos_ids` are always the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hubquant.errors import HubquantError
from hubquant.files import read_json

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


def _token_text(value: Any) -> str | None:
    """A special token's text: a string, or an AddedToken-style {"content": ...}; else None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any, where: str = "config.json", key: str = "eos_token_id") -> list[int]:
    """An `eos_token_id`-style field (an int, a list of ints, or null) as a list.

    Raises:
        HubquantError: for anything else (a string, a bool, a float...), naming the file and key.
    """
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items if v is not None):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise HubquantError(
            f"{where}'s {key} is {shown}, but it must be an integer or a list of integers; fix {key} in {where}"
        )
    return [v for v in items if v is not None]


def eos_token_ids(
    model_config: dict[str, Any],
    generation_config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    token_to_id: Callable[[str], int | None] | None,
) -> tuple[int, ...]:
    """The stop set: every id any of the checkpoint's files calls end-of-sequence.

    In this order, without duplicates: `generation_config.json`'s `eos_token_id` (what
    transformers' `generate` stops on), the id of `tokenizer_config.json`'s `eos_token` (what a
    chat template ends a turn with), then `config.json`'s `eos_token_id`.

    Args:
        model_config: config.json.
        generation_config: generation_config.json ({} when absent).
        tokenizer_config: tokenizer_config.json, special tokens merged ({} when absent).
        token_to_id: the tokenizer's token-to-id lookup (None: no tokenizer, the eos_token is skipped).
    """
    text = _token_text(tokenizer_config.get("eos_token"))
    from_tokenizer = token_to_id(text) if text is not None and token_to_id is not None else None
    ids = [
        *_ids(generation_config.get("eos_token_id"), "generation_config.json"),
        *_ids(from_tokenizer),
        *_ids(model_config.get("eos_token_id"), "config.json"),
    ]
    return tuple(dict.fromkeys(ids))


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` ({} when absent), with `special_tokens_map.json`'s tokens merged in
    as transformers does: only when the config has no `added_tokens_decoder`, and then they win.

    Args:
        folder: the checkpoint folder.
    """

    path = folder / "tokenizer_config.json"
    config = read_json(path, "tokenizer_config.json") if path.is_file() else {}
    special_map = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and special_map.is_file():
        tokens = read_json(special_map, "special_tokens_map.json")
        config.update(
            {f"{role}_token": tokens[f"{role}_token"] for role in SPECIAL_ROLES if f"{role}_token" in tokens}
        )
    return config


class Tokenizer:
    """Encode/decode with the checkpoint's special-token conventions.

    Attributes:
        bos_id, eos_ids, pad_id: special ids (eos may be several: generation stops on any).
        add_bos / add_eos: whether `encode(..., add_special_tokens=True)` adds them (as the
            post-processor of `tokenizer.json` does).
        chat_template: the checkpoint's Jinja chat template, if any.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        pad_id: int | None,
        chat_template: str | None = None,
        clean_up_spaces: bool = False,
    ) -> None:
        """
        Args:
            backend: a `tokenizers.Tokenizer`; its stored truncation and padding are switched off.
            bos_id, eos_ids, pad_id: the special ids.
            chat_template: the Jinja chat template, if any.
            clean_up_spaces: `decode` removes spaces before punctuation and contractions
                (transformers' `clean_up_tokenization`).
        """
        self.backend = backend
        backend.no_truncation()
        backend.no_padding()
        self.bos_id, self.eos_ids, self.pad_id = bos_id, tuple(eos_ids), pad_id
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces
        probe = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        added = len(probe) > len(plain)
        self.add_bos = added and bos_id is not None and probe[0] == bos_id
        self.add_eos = added and probe[-1] in self.eos_ids

    @classmethod
    def from_folder(
        cls, folder: Path, model_config: dict[str, Any], generation_config: dict[str, Any]
    ) -> Tokenizer:
        """The tokenizer of a Hub-layout folder.

        Args:
            folder: holds tokenizer.json, and optionally tokenizer_config.json,
                special_tokens_map.json, chat_template.jinja.
            model_config: config.json (fallback special ids).
            generation_config: generation_config.json, {} when absent (fallback special ids).
        """
        from tokenizers import Tokenizer as Backend

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise HubquantError(
                f"{folder} has no tokenizer.json; only fast (tokenizers) tokenizers are supported"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:
            raise HubquantError(f"{path} cannot be read by tokenizers ({error}); re-download it") from None
        tk_config = read_tokenizer_config(folder)
        vocab_size = model_config.get("vocab_size")
        if isinstance(vocab_size, int) and not isinstance(vocab_size, bool):
            _check_ids_fit(backend, path, vocab_size)
        else:
            vocab_size = None

        def special(role: str, key: str) -> int | None:
            text = _token_text(tk_config.get(f"{role}_token"))
            token_id = backend.token_to_id(text) if text else None
            if token_id is not None:
                return token_id
            where = "generation_config.json" if key in generation_config else "config.json"
            fallback = _ids(generation_config.get(key, model_config.get(key)), where, key)
            # An id outside the vocabulary (several Hub configs say pad_token_id -1) names no token.
            fallback = [i for i in fallback if i >= 0 and (vocab_size is None or i < vocab_size)]
            return fallback[0] if fallback else None

        clean_up = _flag(tk_config, "clean_up_tokenization_spaces", folder)
        if type(backend.model).__name__ == "BPE":  # transformers skips the clean-up for BPE
            clean_up = clean_up and _flag(
                tk_config, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", folder
            )
        return cls(
            backend,
            bos_id=special("bos", "bos_token_id"),
            eos_ids=eos_token_ids(model_config, generation_config, tk_config, backend.token_to_id),
            pad_id=special("pad", "pad_token_id"),
            # as in transformers, a chat_template.jinja file wins over the config's entry
            chat_template=_read_optional(folder / "chat_template.jinja") or _chat_template(tk_config, folder),
            clean_up_spaces=clean_up,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text.
            add_special_tokens: add what the tokenizer's post-processor adds (bos, eos...).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """The text of `ids`.

        Args:
            ids: token ids (a list or a 1-D tensor).
            skip_special_tokens: leave special tokens (bos, eos, pad...) out of the text.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, padding_side: str = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `(input_ids, attention_mask)` for several texts (left padding for generation).

        Args:
            texts: the texts.
            add_special_tokens: as in `encode`.
            padding_side: "left" (for generation) or "right".
        """
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


# transformers' `clean_up_tokenization`, in its order.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _clean_up_spaces(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _read_optional(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HubquantError(f"cannot read {path} as UTF-8 text ({error}); re-download or fix it") from None


def _check_ids_fit(backend: Any, path: Path, vocab_size: int) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding (config.json's vocab_size)."""
    vocab = backend.get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        token = next(t for t, i in vocab.items() if i == top)
        raise HubquantError(
            f"{path} produces token ids up to {top} ({token[:30]!r}), but config.json's vocab_size is "
            f"{vocab_size}: the model has no embedding row for them; use the tokenizer.json that came with "
            "these weights, or fix vocab_size in config.json"
        )


def _flag(config: dict[str, Any], key: str, folder: Path) -> bool:
    value = config.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise HubquantError(
        f"{folder / 'tokenizer_config.json'}'s {key} is {str(value)[:40]!r}, but it must be true or false; "
        "fix it in tokenizer_config.json"
    )


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or transformers' list of named templates
    ([{"name": ..., "template": ...}], whose "default" one is used; None without one)."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        default = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if default is None or isinstance(default, str):
            return default
    raise HubquantError(
        f"{folder / 'tokenizer_config.json'}'s chat_template is neither a string nor a list of named "
        "templates; fix it in tokenizer_config.json"
    )
