"""Special-token conventions come from the checkpoint's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from hubquant.models.tokenizer import Tokenizer

WORDS = ["<pad>", "<s>", "</s>", "<eot>", "hello", "world"]


def folder_with(tmp_path: Path, config: dict | None, bos_template: bool) -> Path:
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(WORDS[:4])
    if bos_template:  # the post-processor itself adds bos (as Llama 3's tokenizer.json does)
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "config,bos_template,want",
    [
        ({"bos_token": "<s>", "add_bos_token": True}, False, [1, 4, 5]),  # we prepend it
        ({"bos_token": "<s>", "add_bos_token": False}, True, [4, 5]),  # the config wins
        ({"bos_token": "<s>"}, True, [1, 4, 5]),  # the post-processor's own, not doubled
        ({"bos_token": "<s>"}, False, [4, 5]),
        (None, False, [4, 5]),
    ],
)
def test_bos_follows_the_checkpoint(tmp_path, config, bos_template, want):
    tok = Tokenizer.from_folder(folder_with(tmp_path, config, bos_template), {"bos_token_id": 1}, {})
    assert tok.encode("hello world") == want
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert tok.decode(want) == "hello world"


def test_eos_and_pad_ids_merge_config_files(tmp_path):
    folder = folder_with(tmp_path, {"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}, False)
    tok = Tokenizer.from_folder(folder, {"eos_token_id": 2}, {"eos_token_id": [3, 2]})
    assert tok.eos_ids == (3, 2) and tok.pad_id == 0


def test_batch_left_pads_with_a_mask(tmp_path):
    tok = Tokenizer.from_folder(
        folder_with(tmp_path, {"bos_token": "<s>", "add_bos_token": True}, False), {}, {}
    )
    ids, mask = tok.batch(["hello", "hello world world"])
    assert ids.tolist() == [[0, 0, 1, 4], [1, 4, 5, 5]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
