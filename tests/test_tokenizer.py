"""The Hub-folder tokenizer against transformers' `AutoTokenizer` on the same folder.

The real case is the embedded SmolLM2-135M-Instruct, converted into a Hub-layout folder, on CPython's
own documentation text; small hand-built folders cover the settings SmolLM2 does not use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

import hubquant
from hubquant.evaluate import pydoc_text
from hubquant.models.tokenizer import Tokenizer, eos_token_ids

pytestmark = pytest.mark.filterwarnings("ignore")

SHORT_TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading spaces, then   a run\t\ttabs\n\n\nand newlines  ",
    "naïve café, 日本語, Ελληνικά, emoji 🤗🐍 and a combining e\u0301",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "special text inside words: x<|endoftext|>y <|im_end|><|im_end|>",
    "<|im_start|",  # almost a special token
    "def f(x):\n    return x ** 2  # comment\n",
    "1234567890 3.14159 -0.5e-10",
]


def reference_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def assert_same_as_reference(ours: Tokenizer, ref, texts: list[str]) -> None:
    """encode with and without special tokens, and decode with and without skipping them."""
    for text in texts:
        for add in (True, False):
            want = ref.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == want, (text[:60], add)
            for skip in (True, False):
                got = ours.decode(want, skip_special_tokens=skip)
                assert got == ref.decode(want, skip_special_tokens=skip), (text[:60], add, skip)


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_folder: Path) -> tuple[Path, Tokenizer, object]:
    folder = smollm2_folder
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    return folder, Tokenizer.from_folder(folder, config, generation), reference_tokenizer(folder)


def test_smollm2_ids_equal_autotokenizer_on_real_text(smol) -> None:
    _, ours, ref = smol
    text = pydoc_text()[:100_000]
    ids = ref.encode(text, add_special_tokens=True)
    assert len(ids) > 15_000  # really the whole 100 kB
    assert_same_as_reference(ours, ref, [text, *SHORT_TEXTS])
    # Pieces cut at arbitrary characters, as a prompt would be.
    assert_same_as_reference(ours, ref, [text[i : i + 257] for i in range(0, 20_000, 1_999)])


def test_smollm2_decodes_any_ids_like_autotokenizer(smol) -> None:
    """Random ids: split UTF-8 byte tokens, special tokens in the middle, repeated spaces."""
    _, ours, ref = smol
    gen = torch.Generator().manual_seed(0)
    specials = sorted(set(ref.all_special_ids))
    for _ in range(20):
        ids = torch.randint(0, ref.vocab_size, (40,), generator=gen).tolist()
        ids[5:5] = specials
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    tensor = torch.tensor(ref.encode("Hello world"))
    assert ours.decode(tensor) == "Hello world"


def test_smollm2_special_ids_equal_autotokenizer(smol) -> None:
    _, ours, ref = smol
    assert ours.bos_id == ref.bos_token_id == 1
    assert ours.pad_id == ref.pad_token_id == 2
    assert ref.eos_token_id == 2 and ours.eos_ids == (2,)
    assert ours.vocab_size == len(ref)
    assert ours.chat_template == ref.chat_template
    assert (ours.add_bos, ours.add_eos) == (False, False)


@pytest.mark.parametrize(
    "config_change,post_processor",
    [
        ({"add_bos_token": True, "add_eos_token": True}, None),  # transformers 5 leaves these unread
        ({"add_bos_token": False}, "bos"),  # ... and follows tokenizer.json's post-processor
        ({}, "bos_eos"),
        ({"clean_up_tokenization_spaces": True}, None),  # BPE: no clean-up (transformers skips it)
        ({}, "truncate"),  # truncation stored in tokenizer.json is off in encode
    ],
)
def test_smollm2_variants_equal_autotokenizer(smol, tmp_path: Path, config_change, post_processor) -> None:
    source, _, _ = smol
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(source / name, folder / name)
    config = {**json.loads((source / "tokenizer_config.json").read_text()), **config_change}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    backend = Backend.from_file(str(source / "tokenizer.json"))
    if post_processor in ("bos", "bos_eos"):
        eos = " <|im_end|>" if post_processor == "bos_eos" else ""
        backend.post_processor = processors.TemplateProcessing(
            single=f"<|im_start|> $A{eos}", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)]
        )
    elif post_processor == "truncate":
        backend.enable_truncation(8)
        backend.enable_padding(length=64, pad_id=2, pad_token="<|im_end|>")
    backend.save(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_folder(folder, json.loads((folder / "config.json").read_text()), {})
    ref = reference_tokenizer(folder)
    assert_same_as_reference(ours, ref, [pydoc_text()[:5_000], *SHORT_TEXTS])
    assert (ours.bos_id, ours.pad_id) == (ref.bos_token_id, ref.pad_token_id)
    assert ours.add_bos == (post_processor in ("bos", "bos_eos"))
    assert ours.add_eos == (post_processor == "bos_eos")


def test_load_gives_the_same_tokenizer_and_stop_set(smollm2_folder: Path, smol) -> None:
    _, _, ref = smol
    model, tokenizer = hubquant.load(smollm2_folder, dtype=torch.bfloat16, progress=False)
    assert tokenizer is not None
    assert model.config.eos_token_ids == tokenizer.eos_ids == (ref.eos_token_id,)
    text = pydoc_text()[:3_000]
    assert tokenizer.encode(text) == ref.encode(text)


# ----------------------------------------------------------------------------------------------------
# Small hand-built folders: settings SmolLM2 does not use

WORDS = ["<pad>", "<s>", "</s>", "<eot>", "hello", "world", ".", ",", "!", "?"]


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
        ({"bos_token": "<s>", "add_bos_token": True}, False, [4, 5]),  # the flag is not read ...
        ({"bos_token": "<s>", "add_bos_token": False}, True, [1, 4, 5]),  # ... tokenizer.json decides
        ({"bos_token": "<s>"}, True, [1, 4, 5]),  # the post-processor's own bos, not doubled
        ({"bos_token": "<s>"}, False, [4, 5]),
        (None, False, [4, 5]),
        ({"bos_token": "<s>", "clean_up_tokenization_spaces": True}, True, [1, 4, 5]),  # WordLevel: cleaned
    ],
)
def test_small_folders_equal_autotokenizer(tmp_path, config, bos_template, want):
    folder = folder_with(tmp_path, config, bos_template)
    tok = Tokenizer.from_folder(folder, {"bos_token_id": 1}, {})
    ref = reference_tokenizer(folder)
    assert tok.encode("hello world") == ref.encode("hello world") == want
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert_same_as_reference(tok, ref, ["hello world", "hello , world . hello ! world ?", "<s> hello </s>"])


def test_special_tokens_map_wins_without_added_tokens_decoder(tmp_path):
    """transformers' legacy rule: special_tokens_map.json overrides the config's token strings."""
    folder = folder_with(tmp_path, {"bos_token": "<eot>", "eos_token": "<eot>"}, False)
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "<pad>"}))
    tok = Tokenizer.from_folder(folder, {}, {})
    ref = reference_tokenizer(folder)
    assert (tok.bos_id, tok.pad_id) == (ref.bos_token_id, ref.pad_token_id) == (1, 0)
    assert tok.eos_ids == (ref.eos_token_id,) == (3,)


def test_batch_left_pads_with_a_mask(tmp_path):
    tok = Tokenizer.from_folder(
        folder_with(tmp_path, {"bos_token": "<s>", "pad_token": "<pad>"}, True), {}, {}
    )
    ids, mask = tok.batch(["hello", "hello world world"])
    assert ids.tolist() == [[0, 0, 1, 4], [1, 4, 5, 5]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    ref = reference_tokenizer(tmp_path)
    ref.padding_side = "left"
    want = ref(["hello", "hello world world"], padding=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


# ----------------------------------------------------------------------------------------------------
# One stop set for generate and the tokenizer


def test_eos_rule_orders_sources_without_duplicates():
    lookup = {"</s>": 2, "<eot>": 3}.get
    assert eos_token_ids({"eos_token_id": 2}, {"eos_token_id": [3, 2]}, {"eos_token": "</s>"}, lookup) == (
        3,
        2,
    )
    assert eos_token_ids({"eos_token_id": [7, 2]}, {}, {"eos_token": {"content": "<eot>"}}, lookup) == (
        3,
        7,
        2,
    )
    assert eos_token_ids({"eos_token_id": 2}, {"eos_token_id": 5}, {"eos_token": "<eot>"}, None) == (5, 2)
    assert eos_token_ids({"eos_token_id": None}, {}, {"eos_token": "<unknown>"}, lookup) == ()


@pytest.mark.parametrize("with_generation_config", [True, False])
def test_model_and_tokenizer_share_one_stop_set(hf_checkpoint, tmp_path, with_generation_config):
    """config.json says 2, generation_config.json says [5, 2], tokenizer_config.json says <eot> (3)."""
    from transformers import GenerationConfig

    source, _ = hf_checkpoint("llama_gqa")
    folder = Path(shutil.copytree(source, tmp_path / "ckpt"))
    folder_with(folder, {"bos_token": "<s>", "eos_token": "<eot>", "pad_token": "<pad>"}, True)
    generation = folder / "generation_config.json"
    if with_generation_config:
        generation.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [5, 2], "pad_token_id": 0}))
    else:
        generation.unlink(missing_ok=True)
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 2

    model, tokenizer = hubquant.load(folder, dtype=torch.float32, progress=False)
    assert tokenizer is not None
    want = (5, 2, 3) if with_generation_config else (3, 2)
    assert model.config.eos_token_ids == tokenizer.eos_ids == want
    # What transformers' generate stops on comes first; the tokenizer's eos is in the set.
    if with_generation_config:
        reference = GenerationConfig.from_pretrained(folder).eos_token_id
        assert list(want[: len(reference)]) == reference
    assert reference_tokenizer(folder).eos_token_id in want
