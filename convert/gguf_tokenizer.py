"""Rebuild a Hub tokenizer (tokenizer.json and friends) from the tokenizer metadata of a GGUF file.

A GGUF has no tokenizer.json: llama.cpp keeps the vocabulary, merges, scores, token types and special
ids as `tokenizer.ggml.*` metadata. We rebuild the same `tokenizers` pipeline transformers' own GGUF
loader builds for these files, so token ids agree with `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from hubquant.errors import HubquantError

logger = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type): only these two become added tokens.
_CONTROL = 3
_USER_DEFINED = 4

# The split regex of Llama 3 style vocabularies, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {
    name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
}
# Pre-tokenizers built with GPT-2's own split (ByteLevel's built-in regex), as transformers builds them.
# Caveat for "smollm": llama.cpp and SmolLM2's Hub tokenizer.json also split digits one by one, so a run
# of whitespace before a digit ("\n   2") is cut differently there; we follow transformers so that ids
# agree with `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
_GPT2_SPLIT = {"gpt-2", "default", "smollm", "phi-2", "starcoder", "refact", "olmo"}


@dataclass
class GGUFTokenizerSpec:
    """The `tokenizer.ggml.*` metadata of one GGUF file.

    Attributes:
        model: `tokenizer.ggml.model` ("gpt2" or "llama").
        pre: `tokenizer.ggml.pre`, the pre-tokenizer name, when given.
        tokens: the vocabulary, by id.
        token_types: llama.cpp token type per id (may be empty).
        scores: per-token scores (sentencepiece vocabularies).
        merges: "a b" merge rules, when the file has them.
        special_ids: "bos"/"eos"/"unk"/"pad" -> token id, for those the file gives.
        add_bos / add_eos: `tokenizer.ggml.add_bos_token` / `add_eos_token`, None when absent.
        add_space_prefix: `tokenizer.ggml.add_space_prefix`, None when absent.
        chat_template: `tokenizer.chat_template`, when present.
        max_length: the model's context length, for `model_max_length`.
    """

    model: str
    tokens: list[str]
    pre: str | None = None
    token_types: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    max_length: int | None = None

    def special_token(self, role: str) -> str | None:
        """The text of the bos/eos/unk/pad token, or None when the file names none."""
        token_id = self.special_ids.get(role)
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else None

    @property
    def adds_bos(self) -> bool:
        # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to; transformers follows it.
        return self.add_bos if self.add_bos is not None else self.model == "llama"

    @property
    def adds_eos(self) -> bool:
        return bool(self.add_eos)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_model(spec: GGUFTokenizerSpec) -> tuple[Tokenizer, set[str]]:
    """Byte-level BPE; returns it and the byte alphabet (tokens outside it get respelled)."""
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    vocab = {}
    for index, token in enumerate(spec.tokens):
        # A token written in plain text (outside the byte alphabet) is respelled byte by byte.
        spelled = token if set(token) <= alphabet else "".join(table[b] for b in token.encode("utf-8"))
        vocab[spelled] = index
    merges = [tuple(m.split(" ", 1)) for m in spec.merges or []]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(spec.pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, alphabet


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _SPLIT_REGEXES.get(pre or "default")
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_SPLIT and pre is not None:
        # transformers falls back to GPT-2's split too; say so, since ids may then differ from llama.cpp.
        logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a token into two known tokens,
    best score first (the order transformers' `generate_merges` produces, ties kept in vocabulary order).

    Args:
        tokens: the vocabulary, by id.
        scores: each token's score.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores, strict=True):
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        candidates.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_model(spec: GGUFTokenizerSpec) -> Tokenizer:
    """Sentencepiece-style BPE (Llama 1/2, Mistral, Gemma...): byte fallback and `▁` for spaces."""
    if spec.merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    elif len(spec.scores) == len(spec.tokens):
        merges = sentencepiece_merges(spec.tokens, spec.scores)
    else:
        raise HubquantError("GGUF sentencepiece vocabulary has neither merges nor per-token scores")
    vocab = {token: index for index, token in enumerate(spec.tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp prepends a space only to the start of the text, unless the file turns it off.
    prefix = spec.add_space_prefix is not False
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, spec: GGUFTokenizerSpec, alphabet: set[str] | None) -> None:
    """Keep control and user-defined tokens whole: control ones (and bos/eos/unk/pad) as special.

    In a byte-level vocabulary, a "control" token spelled outside the byte alphabet is a llama.cpp
    mislabel; like transformers we leave it as a plain vocabulary entry.
    """
    vocab = tokenizer.get_vocab()
    named = {spec.special_token(role) for role in ("bos", "eos", "unk", "pad")} - {None}
    special, user = [], []
    for index, token in enumerate(spec.tokens):
        kind = spec.token_types[index] if index < len(spec.token_types) else 1
        if alphabet is not None and not set(token) <= alphabet:
            continue
        if kind == _CONTROL or token in named:
            special.append(AddedToken(token, normalized=False, special=True))
        elif kind == _USER_DEFINED and token in vocab:
            user.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _post_processor(spec: GGUFTokenizerSpec) -> processors.TemplateProcessing:
    """BOS/EOS insertion as `tokenizer.ggml.add_bos_token` / `add_eos_token` say."""
    bos, eos = spec.special_token("bos"), spec.special_token("eos")
    add_bos, add_eos = spec.adds_bos and bos is not None, spec.adds_eos and eos is not None
    head = f"{bos}:0 " if add_bos else ""
    tail = f" {eos}:0" if add_eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(bos, spec.special_ids["bos"])] if add_bos else []
    if add_eos and eos != bos:
        specials.append((eos, spec.special_ids["eos"]))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    """The `tokenizers` pipeline described by a GGUF's tokenizer metadata.

    Args:
        spec: the file's tokenizer metadata.

    Raises:
        HubquantError: for a tokenizer model other than "gpt2" and "llama".
    """
    alphabet = None
    if spec.model == "gpt2":
        tokenizer, alphabet = _byte_level_model(spec)
    elif spec.model == "llama":
        tokenizer = _sentencepiece_model(spec)
    else:
        raise HubquantError(f"GGUF tokenizer model {spec.model!r} is not supported; supported: gpt2, llama")
    _add_special_tokens(tokenizer, spec, alphabet)
    tokenizer.post_processor = _post_processor(spec)
    return tokenizer


def tokenizer_files(spec: GGUFTokenizerSpec) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a Hub folder.

    Args:
        spec: the file's tokenizer metadata.
    """
    tokenizer = build_tokenizer(spec)
    named = {f"{role}_token": spec.special_token(role) for role in ("bos", "eos", "pad", "unk")}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.adds_bos,
        "add_eos_token": spec.adds_eos,
        **named,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_length or 1_000_000_000_000_000_019_884_624_838_656,
    }
    if spec.chat_template:
        config["chat_template"] = spec.chat_template
    special_map = {key: value for key, value in named.items() if value is not None}
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
    }


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
