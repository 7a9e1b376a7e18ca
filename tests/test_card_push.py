"""The model card, quantization_report.json, `push` against a recording stand-in for HfApi, and the
`quantize` / `push` commands.

The quantized folder is fabricated (config.json with a quantization_config, a small safetensors
file, the card and report from `write_card` with a hand-made QuantReport): these tests do not
depend on the quantization methods. Hub errors are huggingface_hub's own exception classes, made
by its `hf_raise_for_status` from fake httpx2 responses, as huggingface_hub's tests make them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from hubquant.cli import main
from hubquant.errors import HubquantError
from hubquant.quantize import card as card_module
from hubquant.quantize.base import LayerRecord, QuantReport
from hubquant.quantize.card import fill_repo_id, render_card, report_summary, write_card
from hubquant.quantize.push import push

TOKEN = "hf_SECRETtoken123"
BASE = "HuggingFaceTB/SmolLM2-135M"
REPO = "someorg/SmolLM2-135M-int4"
HOSTILE = "evil: \"quoted\" 'name' <script>alert(1)</script> | *bold* `tick`\n---\nlicense: mit"

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 1,
    "torch_dtype": "bfloat16",
}
QUANTIZATION_CONFIG = {
    "quant_method": "torchao",
    "quant_type": {"default": {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {}}},
    "modules_to_not_convert": ["model.layers.0.self_attn.k_proj"],
}


def make_report(skip_reason: str | None = "no group size of 128, 64 or 32 divides 576 + 8") -> QuantReport:
    layers = [
        LayerRecord(
            "layers.0.attn.q", (576, 576), {"group_size": 64}, None, 576 * 576 + 2 * 576 * 9 * 2, 183_000
        ),
        LayerRecord("layers.0.mlp.down", (576, 1536), {"group_size": 128}, None, 576 * 1536 + 4_000, 450_000),
        LayerRecord("layers.0.mlp.up", (1536, 576), {"group_size": 64}, None, 1536 * 576 + 6_000, 455_000),
    ]
    if skip_reason:
        layers.append(LayerRecord("layers.0.attn.k", (192, 584), {}, skip_reason, 2 * 192 * 584, 0))
    return QuantReport("int4", {"group_size": 128, "hqq": False}, "torchao", "0.18.0", layers)


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"\A---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


@pytest.fixture(autouse=True)
def no_hub_license_lookup(monkeypatch):
    """The card asks the Hub for a base model's license only when the source folder lacks it;
    in these tests that answer is "unknown" unless a test says otherwise."""
    monkeypatch.setattr(card_module, "_hub_license", lambda repo_id: {})


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# SmolLM2\n")
    return folder


@pytest.fixture
def quantized(tmp_path, source) -> Path:
    """A quantized folder as `hubquant quantize --out` writes it, fabricated."""
    folder = tmp_path / "SmolLM2-135M-int4"
    folder.mkdir()
    config = {**BASE_CONFIG, "dtype": "bfloat16", "quantization_config": QUANTIZATION_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {"model.embed_tokens.weight": np.ones((8, 4), dtype=np.float32)}, str(folder / "model.safetensors")
    )
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / ".cache").mkdir()
    (folder / ".cache" / "stale").write_text("never uploaded")
    write_card(folder, base_model=BASE, base_config=BASE_CONFIG, report=make_report(), source_folder=source)
    return folder


# --- the card ------------------------------------------------------------------------------------


def test_card_front_matter_and_report_file(quantized):
    text = (quantized / "README.md").read_text()
    meta = front_matter(text)
    assert meta == {
        "base_model": BASE,
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["hubquant", "int4", "torchao", "4-bit"],
        "pipeline_tag": "text-generation",
    }
    report = json.loads((quantized / "quantization_report.json").read_text())
    assert report == {"base_model": BASE, **json.loads(json.dumps(make_report().to_dict()))}
    assert report["layers"][-1]["skipped"].startswith("no group size")


def test_card_settings_sizes_and_usage(quantized):
    text = (quantized / "README.md").read_text()
    report = make_report()
    assert "| group\\_size | 128 |" in text and "| hqq | False |" in text
    assert "| quantized layers | 3 of 4 |" in text
    assert "| group\\_size=64 | 2 |" in text and "| group\\_size=128 | 1 |" in text  # per layer
    disk = sum(layer.disk_bytes for layer in report.layers)
    runtime = sum(layer.runtime_bytes or layer.disk_bytes for layer in report.layers)
    files = (quantized / "model.safetensors").stat().st_size
    assert f"| projection weights on disk | {disk / 1e6:.2f} MB | {disk:,} |" in text
    assert f"| {runtime:,} |" in text and f"| {files:,} |" in text
    assert "one byte per 4-bit value" in text  # what the int4 disk figure means
    assert "embeddings, norms and the output head stay in bfloat16" in text
    assert "AutoModelForCausalLM.from_pretrained(model_id" in text and "hubquant.load(model_id)" in text
    assert "hubquant quantize HuggingFaceTB/SmolLM2-135M --method int4 --group-size 128" in text
    assert "## Evaluation" not in text  # no results given


def test_card_of_a_head_with_its_own_method(tmp_path, source):
    """`--head int8`: the card says how the head was quantized, the settings table does not
    repeat it, and the command that reproduces the folder names `--head int8`."""
    report = make_report()
    report.settings["head"] = "int8"
    report.layers.append(
        LayerRecord("lm_head", (49152, 576), {"method": "int8"}, None, 49152 * 578, 28_400_000)
    )
    folder = tmp_path / "head"
    folder.mkdir()
    write_card(folder, base_model=BASE, base_config=BASE_CONFIG, report=report, source_folder=source)
    text = (folder / "README.md").read_text()
    assert "| output head | quantized with int8 (the projections with int4) |" in text
    assert "| head |" not in text and "| method=int8 | 1 |" in text
    assert "--method int4 --group-size 128 --head int8 --out" in text and "--include-head" not in text


def test_skipped_layers_table(quantized, tmp_path):
    text = (quantized / "README.md").read_text()
    section = text.split("## Skipped layers", 1)[1].split("\n## ", 1)[0]
    assert "| layer | shape | reason |" in section
    assert "| layers.0.attn.k | 192 x 584 | no group size of 128, 64 or 32 divides 576 + 8 |" in section

    none = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(None))
    section = none.split("## Skipped layers", 1)[1].split("\n## ", 1)[0]
    assert "None: every projection was quantized." in section and "| reason |" not in section


def test_results_table_renders_the_columns_present():
    results = {
        "method": "wikitext-2, 512-token windows",
        "rows": [
            {"variant": "bf16", "ppl": 12.34567, "decode_tok_s": 24.61},
            {
                "variant": "int4 | g128",
                "ppl": 12.9,
                "kld_mean": 0.0123,
                "top1_agreement": 0.9512,
                "decode_tok_s": 40.06,
            },
        ],
    }
    text = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(), results=results)
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "Measured by hubquant: wikitext-2, 512-token windows." in section
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0] == (
        "| variant | perplexity | mean KL divergence to the base model | top-1 agreement with the base model "
        "| decode, tok/s |"
    )
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| bf16 | 12.35 | - | - | 24.6 |"
    assert lines[3] == "| int4 \\| g128 | 12.9 | 0.0123 | 95.12% | 40.1 |"

    only_ppl = render_card(
        base_model=BASE,
        base_config=BASE_CONFIG,
        report=make_report(),
        results={"rows": [{"variant": "a", "ppl": 3.0}]},
    )
    assert "| variant | perplexity |\n|---|---|\n| a | 3 |" in only_ppl
    assert "## Evaluation" not in render_card(
        base_model=BASE, base_config=BASE_CONFIG, report=make_report(), results={"rows": []}
    )


def test_hostile_names_stay_data(tmp_path):
    """Quotes, colons, `---`, pipes and <script> neither break the YAML nor reach the page as markup."""
    src = tmp_path / "src"
    src.mkdir()
    license_meta = {
        "license": "other",
        "license_name": HOSTILE,
        "license_link": "https://x.example/?a=1&b=<2>",
    }
    (src / "README.md").write_text("---\n" + yaml.safe_dump(license_meta) + "---\n")
    local_base = tmp_path / HOSTILE.replace("/", "_").replace("\n", " ")
    local_base.mkdir()
    report = make_report(skip_reason=HOSTILE)
    report.settings["note"] = HOSTILE
    results = {"method": HOSTILE, "rows": [{"variant": HOSTILE, "ppl": 1.5}]}
    text = render_card(
        base_model=str(local_base), base_config=BASE_CONFIG, report=report, source_folder=src, results=results
    )
    meta = front_matter(text)
    # The local base is no Hub id: no base_model metadata, and its path stays private.
    assert meta == {
        "library_name": "transformers",
        **license_meta,
        "tags": ["hubquant", "int4", "torchao", "4-bit"],
        "pipeline_tag": "text-generation",
    }
    assert str(tmp_path) not in text
    body = text.split("\n---\n", 1)[1]
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert "\n---\nlicense: mit" not in body
    skipped_row = next(line for line in body.splitlines() if line.startswith("| layers.0.attn.k"))
    assert len(re.findall(r"(?<!\\)\|", skipped_row)) == 4  # three cells: no pipe escaped the cell
    assert "\\*bold\\*" in skipped_row and "\\`tick\\`" in skipped_row

    # A quoted, colon-holding name inside the YAML survives exactly.
    from hubquant.quantize.card import _yaml

    assert yaml.safe_load(_yaml({"base_model": 'a: "b" c'}))["base_model"] == 'a: "b" c'


def test_license_other_carried_and_unknown_left_out(tmp_path):
    text = render_card(base_model=str(tmp_path), base_config=BASE_CONFIG, report=make_report())
    assert "license" not in front_matter(text)
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("no front matter here")
    text = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(), source_folder=src)
    assert "license" not in front_matter(text)


def test_license_from_the_hub_when_the_source_folder_has_none(monkeypatch, tmp_path):
    monkeypatch.setattr(
        card_module, "_hub_license", lambda repo_id: {"license": "llama3.1"} if repo_id == BASE else {}
    )
    text = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(), source_folder=tmp_path)
    assert front_matter(text)["license"] == "llama3.1"


def test_repo_id_fills_the_snippets():
    text = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report())
    assert text.count('model_id = "ORG/NAME"  # this repository once pushed, or the local folder') == 2
    filled = fill_repo_id(text, REPO)
    assert filled.count(f'model_id = "{REPO}"\n') == 2 and "ORG/NAME" not in filled
    assert render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(), repo_id=REPO) == filled


def test_report_summary():
    summary = report_summary(make_report())
    lines = summary.splitlines()
    assert lines[0] == "method: int4 (torchao 0.18.0); settings: group_size=128, hqq=False"
    assert "quantized: 3 layers; skipped: 1" in lines
    assert "  skipped layers.0.attn.k (192 x 584): no group size of 128, 64 or 32 divides 576 + 8" in lines
    assert lines[-1].startswith("projection weights: ") and "on disk" in lines[-1]
    assert report_summary(make_report().to_dict()) == summary  # the JSON form reads the same


# --- push against a recording stand-in -----------------------------------------------------------


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records each call; `fail` maps a method to the
    exception it raises. Any other HfApi method (upload_folder...) is a test failure."""

    def __init__(self, token: str | None = None, fail: dict[str, BaseException] | None = None, public=False):
        self.token = token
        self.fail = fail or {}
        self.public = public
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _call(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, **kwargs):
        self._call("create_repo", kwargs)
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def repo_info(self, **kwargs):
        self._call("repo_info", kwargs)
        return SimpleNamespace(private=not self.public)

    def create_branch(self, **kwargs):
        self._call("create_branch", kwargs)

    def create_commit(self, **kwargs):
        operations = kwargs["operations"]
        kwargs["files"] = {
            op.path_in_repo: op.path_or_fileobj
            if isinstance(op.path_or_fileobj, bytes)
            else Path(op.path_or_fileobj).read_bytes()
            for op in operations
        }
        self._call("create_commit", kwargs)
        return SimpleNamespace(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abcd", oid="0123abcd"
        )

    def __getattr__(self, name):
        raise AssertionError(f"push called HfApi.{name}, which the stand-in does not expect")


@pytest.fixture
def hub(monkeypatch):
    """HF_TOKEN set to a recognisable fake; huggingface_hub.HfApi replaced by the recording stand-in."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    made: list[RecordingApi] = []

    def factory(token=None, **kwargs):
        api = RecordingApi(token=token, **getattr(factory, "options", {}))
        made.append(api)
        return api

    monkeypatch.setattr(huggingface_hub, "HfApi", factory)
    factory.made = made
    return factory


def hub_error(status: int, url: str, **response: Any) -> Exception:
    """huggingface_hub's own exception for a response, as `hf_raise_for_status` raises it."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    try:
        hf_raise_for_status(httpx2.Response(status, request=httpx2.Request("POST", url), **response))
    except Exception as error:
        return error
    raise AssertionError("no error raised")


def folder_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
    }


def test_push_uploads_the_folder_in_one_commit(quantized, hub):
    url = push(quantized, REPO)
    assert url == f"https://huggingface.co/{REPO}/commit/0123abcd"
    (api,) = hub.made
    assert api.token == TOKEN  # resolved from HF_TOKEN by huggingface_hub
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_commit"]
    create = api.calls[0][1]
    assert create["repo_id"] == REPO and create["exist_ok"] is True and create["private"] is False
    commit = api.calls[1][1]
    assert commit["repo_id"] == REPO and commit["revision"] is None
    assert (
        set(commit["files"])
        == folder_files(quantized)
        == {
            "README.md",
            "config.json",
            "model.safetensors",
            "quantization_report.json",
            "tokenizer.json",
        }
    )
    assert "int4" in commit["commit_message"] and BASE in commit["commit_message"]
    assert commit["files"]["model.safetensors"] == (quantized / "model.safetensors").read_bytes()
    card = commit["files"]["README.md"].decode()
    assert front_matter(card)["base_model"] == BASE and front_matter(card)["license"] == "apache-2.0"
    assert f'model_id = "{REPO}"' in card
    assert 'model_id = "ORG/NAME"' in (quantized / "README.md").read_text()  # the local card is untouched


def test_push_private_to_a_branch(quantized, hub):
    push(quantized, REPO, private=True, revision="int4-g128")
    (api,) = hub.made
    assert [name for name, _ in api.calls] == ["create_repo", "repo_info", "create_branch", "create_commit"]
    assert api.calls[0][1]["private"] is True
    assert api.calls[2][1]["branch"] == "int4-g128" and api.calls[2][1]["exist_ok"] is True
    assert api.calls[3][1]["revision"] == "int4-g128"


def test_push_private_refuses_an_existing_public_repo(quantized):
    api = RecordingApi(public=True)
    with pytest.raises(HubquantError, match="already exists and is public"):
        push(quantized, REPO, private=True, api=api)
    assert "create_commit" not in [name for name, _ in api.calls]


def test_push_with_a_given_api_and_token(quantized):
    api = RecordingApi()
    push(quantized, REPO, api=api, token="hf_other")
    assert all(kwargs.get("token") == "hf_other" for _, kwargs in api.calls)


HUB_ERRORS = {
    "401": (
        "create_repo",
        lambda: hub_error(
            401,
            "https://huggingface.co/api/repos/create",
            headers={"X-Error-Message": "Invalid credentials in Authorization header"},
        ),
        "hf auth login",
    ),
    "403": (
        "create_repo",
        lambda: hub_error(
            403,
            "https://huggingface.co/api/repos/create",
            json={"error": 'You don\'t have the rights to create a model under the namespace "someorg"'},
        ),
        "no write access to 'someorg'",
    ),
    "404": (
        "create_commit",
        lambda: hub_error(
            404,
            f"https://huggingface.co/api/models/{REPO}/commit/main",
            headers={"X-Error-Code": "RepoNotFound"},
        ),
        f"{REPO} was not found on the Hub (404)",
    ),
    "404-branch": (
        "create_commit",
        lambda: hub_error(
            404,
            f"https://huggingface.co/api/models/{REPO}/commit/q4",
            headers={"X-Error-Code": "RevisionNotFound"},
        ),
        "branch 'q4' was not found",
    ),
    "network": (
        "create_repo",
        lambda: __import__("httpx2").ConnectError("[Errno -2] Name or service not known"),
        "cannot reach the Hugging Face Hub (no connection",
    ),
    "500-echoing-the-token": (
        "create_commit",
        lambda: hub_error(
            500, f"https://huggingface.co/api/models/{REPO}/commit/main", json={"error": f"bad {TOKEN}"}
        ),
        "the Hub refused the push",
    ),
}


@pytest.mark.parametrize("case", HUB_ERRORS)
def test_hub_errors_are_one_line(quantized, hub, case, capsys, caplog):
    method, make, expected = HUB_ERRORS[case]
    hub.options = {"fail": {method: make()}}
    caplog.set_level(logging.DEBUG)
    status = main(["push", str(quantized), "--repo-id", REPO, "--revision", "q4"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.startswith("hubquant: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert expected in err, err
    assert TOKEN not in err and TOKEN not in caplog.text


def test_not_logged_in(quantized, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kwargs: pytest.fail("HfApi made without a token"))
    with pytest.raises(HubquantError, match=r"not logged in .*hf auth login.*HF_TOKEN"):
        push(quantized, REPO)


def test_token_is_never_printed_logged_or_written(quantized, hub, capsys, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    assert main(["push", str(quantized), "--repo-id", REPO, "--private", "--revision", "b"]) == 0
    assert main(["push", str(quantized), "--repo-id", REPO, "--dry-run"]) == 0
    hub.options = {
        "fail": {"create_commit": hub_error(401, "https://huggingface.co/api/models/x/y/commit/main")}
    }
    assert main(["push", str(quantized), "--repo-id", REPO]) == 1
    out, err = capsys.readouterr()
    assert f"https://huggingface.co/{REPO}/commit/0123abcd" in out
    assert TOKEN not in out and TOKEN not in err and TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert [api.token for api in hub.made] == [TOKEN, TOKEN]  # it did reach huggingface_hub


def test_a_file_holding_the_token_is_not_uploaded(quantized, hub, capsys):
    (quantized / "notes.txt").write_text(f"my token is {TOKEN}\n")
    assert main(["push", str(quantized), "--repo-id", REPO]) == 1
    err = capsys.readouterr().err
    assert "notes.txt contains your Hub token" in err and TOKEN not in err
    assert [name for api in hub.made for name, _ in api.calls] == []


def test_dry_run_contacts_nothing_and_prints_files_and_card(quantized, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def refuse(*args, **kwargs):
        raise AssertionError("dry run opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)
    before = {p: p.read_bytes() for p in quantized.rglob("*") if p.is_file()}

    assert main(["push", str(quantized), "--repo-id", REPO, "--private", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "nothing is sent" in out and "private if created" in out
    for name in folder_files(quantized):
        assert re.search(rf"^\s+\d[\d.]* (B|kB|MB)  {re.escape(name)}$", out, re.MULTILINE), name
    assert ".cache/stale" not in out
    size = (quantized / "model.safetensors").stat().st_size
    assert f"{size} B  model.safetensors" in out or f"{size / 1e3:.2f} kB  model.safetensors" in out
    assert "Add int4 quantization of HuggingFaceTB/SmolLM2-135M" in out
    card = out.split("README.md:\n", 1)[1]
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M\n") and f'model_id = "{REPO}"' in card
    assert TOKEN not in out
    assert before == {p: p.read_bytes() for p in quantized.rglob("*") if p.is_file()}

    api = RecordingApi()
    text = push(quantized, REPO, dry_run=True, api=api)
    assert api.calls == [] and "README.md:" in text


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no-quantization", "has no quantization_config"),
        ("no-card", "has no README.md"),
        ("no-weights", "has no .safetensors weights"),
        ("bad-config", "is not valid JSON"),
        ("missing", "is not a folder"),
    ],
)
def test_bad_folders_are_one_line(quantized, breakage, expected, capsys):
    if breakage == "no-quantization":
        (quantized / "config.json").write_text(json.dumps(BASE_CONFIG))
    elif breakage == "no-card":
        (quantized / "README.md").unlink()
    elif breakage == "no-weights":
        (quantized / "model.safetensors").unlink()
    elif breakage == "bad-config":
        (quantized / "config.json").write_text("{not json")
    folder = quantized / "nowhere" if breakage == "missing" else quantized
    assert main(["push", str(folder), "--repo-id", REPO, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "org/bad name", "org/../x", "-org/x"])
def test_bad_repo_ids(quantized, repo_id, capsys):
    assert main(["push", str(quantized), f"--repo-id={repo_id}", "--dry-run"]) == 1
    assert "is not a Hub model id" in capsys.readouterr().err


# --- the commands --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["push", "folder"],  # --repo-id missing
        ["push"],
        ["quantize", "m"],  # --method missing
        ["quantize", "m", "--method", "int3"],
        ["quantize", "m", "--method", "int4", "--group-size", "big"],
        ["quantize", "m", "--method", "int8", "--dtype", "fp16"],
    ],
)
def test_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "hubquant" in capsys.readouterr().err


def test_quantize_force_needs_out(capsys):
    assert main(["quantize", "m", "--method", "int8", "--force"]) == 1
    assert "--force" in capsys.readouterr().err


def test_quantize_command_with_out(monkeypatch, capsys, tmp_path):
    from hubquant.quantize import core  # the module (`import ... as` would give the function)

    seen = {}

    def fake(source, out, method, **kwargs):
        seen.update(source=source, out=out, method=method, **kwargs)
        return Path(out), make_report()

    monkeypatch.setattr(core, "quantize_checkpoint", fake)
    argv = ["quantize", BASE, "--method", "int4", "--group-size", "64", "--hqq", "--out", str(tmp_path / "q")]
    assert main([*argv, "--force", "--revision", "v1", "--dtype", "fp32", "--head", "int8"]) == 0
    assert seen == dict(
        source=BASE,
        out=str(tmp_path / "q"),
        method="int4",
        group_size=64,
        hqq=True,
        include_head=False,
        head="int8",
        dtype="fp32",
        revision="v1",
        force=True,
        device_map=None,
        max_memory=None,
        device="cuda" if torch.cuda.is_available() else "cpu",  # where each layer is quantized
        calibration=None,  # int4 is not calibrated
    )
    out = capsys.readouterr().out
    assert report_summary(make_report()) in out and f"wrote {tmp_path / 'q'}" in out


def test_quantize_command_in_memory(monkeypatch, capsys):
    import hubquant.models
    from hubquant.quantize import core

    seen = {}
    monkeypatch.setattr(hubquant.models, "load", lambda source, **kw: (seen.update(load=(source, kw)), None))

    def fake_quantize(model, method, **kwargs):
        seen["quantize"] = (method, kwargs)
        return make_report()

    monkeypatch.setattr(core, "quantize", fake_quantize)
    assert main(["quantize", BASE, "--method", "nf4", "--include-head"]) == 0
    assert seen["load"] == (BASE, {"revision": None, "dtype": "bf16", "device": "cpu"})
    assert seen["quantize"] == ("nf4", {"group_size": None, "hqq": False, "include_head": True, "head": None})
    out = capsys.readouterr().out
    assert "skipped layers.0.attn.k" in out and "nothing written" in out


def test_lazy_quantize_names_and_light_imports(quantized):
    """`import hubquant.quantize` and `push --dry-run` import no torch; `hubquant.quantize` is the
    subpackage, callable as the `quantize` function, and its submodules import as usual."""
    code = f"""
        import contextlib, io, sys, types

        import hubquant.quantize
        from hubquant.quantize import push
        import hubquant.quantize.card
        from hubquant.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["push", {str(quantized)!r}, "--repo-id", "a/b", "--dry-run"]) == 0
        assert "README.md:" in out.getvalue()
        assert "torch" not in sys.modules, "torch imported"
        assert isinstance(push, types.FunctionType) and push.__module__ == "hubquant.quantize.push"

        import hubquant.quantize.core as qc
        from hubquant import quantize
        from hubquant.quantize import QuantReport, core, quantize_checkpoint
        assert quantize is hubquant.quantize is sys.modules["hubquant.quantize"] and callable(quantize)
        assert qc is core and hubquant.quantize.quantize is core.quantize
        assert hubquant.quantize.push is push
        assert isinstance(core, types.ModuleType) and callable(quantize_checkpoint)
        assert QuantReport.__name__ == "QuantReport"
        print("ok")
    """
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --- the figures of `hubquant eval` in the pushed card ---------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "reports" / "examples"
DECODER_RESULTS = EXAMPLES / "SmolLM2-135M-Instruct" / "results.json"
ENCODER_RESULTS = EXAMPLES / "all-MiniLM-L6-v2" / "results.json"
ENCODER_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "torch_dtype": "float32"}


def make_variant(
    folder: Path, base_config: dict[str, Any] = BASE_CONFIG, report: QuantReport | None = None
) -> Path:
    """A quantized folder as `hubquant quantize --out` (or eval, into OUT/variants/NAME) writes it."""
    folder.mkdir(parents=True)
    config = {**base_config, "quantization_config": QUANTIZATION_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"embeddings.weight": np.ones((8, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    write_card(folder, base_model=BASE, base_config=base_config, report=report or make_report())
    return folder


def eval_out(
    tmp_path: Path, example: Path, variant: str = "int4", **kwargs: Any
) -> tuple[Path, dict[str, Any]]:
    """OUT as `hubquant eval --out OUT` leaves it: OUT/results.json (a copy of a real one) and the
    variant's folder OUT/variants/NAME. Returns (the variant's folder, the results)."""
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "results.json").write_text(example.read_text())
    return make_variant(out / "variants" / variant, **kwargs), json.loads(example.read_text())


def row_of(results: dict[str, Any], variant: str) -> dict[str, Any]:
    return next(row for row in results["rows"] if row["variant"] == variant)


def uploaded_card(hub) -> str:
    (api,) = hub.made
    return api.calls[-1][1]["files"]["README.md"].decode()


def evaluation_section(card: str) -> str:
    return card.split("\n## Evaluation\n", 1)[1].split("\n## ", 1)[0]


def table(section: str) -> dict[str, dict[str, str]]:
    """The evaluation table: the first cell of each row -> {column title: cell}."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header, rows = split[0], split[2:]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def hub_metrics(card: str) -> dict[str, Any]:
    """The `model-index` as the Hub reads it (huggingface_hub's own parser): metric name -> EvalResult."""
    data = huggingface_hub.ModelCard(card).data
    return {result.metric_name: result for result in data.eval_results}


def figure(value: float, spread: float | None = None, kind: str = "float") -> str:
    text = f"{value:.1f}" if kind == "rate" else f"{value:.4g}"
    if spread is not None:
        text += " ± " + (f"{spread:.1f}" if kind == "rate" else f"{spread:.2g}")
    return text


def test_push_of_an_eval_variant_carries_its_figures_and_the_bases(tmp_path, hub):
    """OUT/variants/int4 with OUT/results.json beside: found without being named; the uploaded
    card has the table and the model-index with int4's and the base's figures from the file."""
    folder, results = eval_out(tmp_path, DECODER_RESULTS)
    local_card = (folder / "README.md").read_text()
    push(folder, REPO)
    card = uploaded_card(hub)
    assert (folder / "README.md").read_text() == local_card  # staged: the folder is not changed
    assert "## Evaluation" not in local_card and "model-index" not in local_card

    int4, base = row_of(results, "int4"), row_of(results, "base")
    rows = table(evaluation_section(card))
    assert list(rows) == ["base (bfloat16)", "int4 (this model)"]  # nf4 and int8 are not this model
    for label, row in (("int4 (this model)", int4), ("base (bfloat16)", base)):
        cells = rows[label]
        assert cells["perplexity"] == figure(row["ppl"], row["ppl_err"])
        assert cells["mean KL divergence to the base model"] == figure(row["kld_mean"], row["kld_err"])
        assert cells["top-1 agreement with the base model"] == f"{100 * row['top1_agreement']:.2f}%"
        assert cells["decode, tok/s"] == figure(row["decode_tok_s"], row["decode_sd"], "rate")
        assert cells["on disk"] == card_module.human_bytes(row["disk_bytes"])
        assert cells["weights in memory"] == card_module.human_bytes(row["weight_bytes"])
    section = evaluation_section(card)
    method, dataset = results["method"], results["dataset"]
    assert (
        f"sha256 {dataset['sha256']}" in section
        and f"{dataset['name']}, {dataset['chars']:,} characters" in section
    )
    assert f"{method['windows']} windows of {method['ctx']} tokens" in section
    assert f"{method['tokens_scored']:,} tokens scored" in section and "± is the standard error" in section
    assert card_module.md_escape(results["verdict"]["text"]) in section

    meta = front_matter(card)
    assert meta["base_model"] == BASE and meta["pipeline_tag"] == "text-generation"
    (entry,) = meta["model-index"]
    assert entry["name"] == REPO.split("/")[1]
    (result,) = entry["results"]
    assert result["task"] == {"type": "text-generation"}
    assert result["dataset"] == {
        "name": dataset["name"],
        "type": dataset["name"],
        "args": {"sha256": dataset["sha256"]},
    }
    assert entry["verdict"] == results["verdict"]["text"]
    metrics = hub_metrics(card)
    expected = {
        "Perplexity (int4)": int4["ppl"],
        "Mean KL divergence to the base model, nats/token (int4)": int4["kld_mean"],
        "Top-1 agreement with the base model (int4)": int4["top1_agreement"],
        "Decode speed, tokens/s (int4)": int4["decode_tok_s"],
        "Checkpoint size on disk, bytes (int4)": int4["disk_bytes"],
        "Perplexity (base model, bfloat16)": base["ppl"],
        "Decode speed, tokens/s (base model, bfloat16)": base["decode_tok_s"],
        "Checkpoint size on disk, bytes (base model, bfloat16)": base["disk_bytes"],
    }
    assert {name: result.metric_value for name, result in metrics.items()} == expected
    assert all(
        r.task_type == "text-generation" and r.dataset_name == dataset["name"] for r in metrics.values()
    )
    ppl = metrics["Perplexity (int4)"]
    assert ppl.metric_type == "perplexity" and ppl.metric_args["stderr"] == int4["ppl_err"]
    assert (
        ppl.metric_args["ctx"] == method["ctx"]
        and ppl.metric_args["tokens_scored"] == method["tokens_scored"]
    )


def test_push_results_names_the_file_for_any_folder_encoder(tmp_path, hub, capsys):
    """`--results PATH` for a folder outside OUT/variants: the row is found by the folder's method;
    an embedder's own figures (cosine mean/min, NN@10, encode speed) go into the card."""
    folder = make_variant(tmp_path / "my-minilm-q4", base_config=ENCODER_CONFIG)
    results = json.loads(ENCODER_RESULTS.read_text())
    argv = ["push", str(folder), "--repo-id", REPO, "--results", str(ENCODER_RESULTS)]
    assert main(argv) == 0, capsys.readouterr().err
    card = uploaded_card(hub)
    int4, base = row_of(results, "int4"), row_of(results, "base")
    k = results["method"]["nn_k"]
    rows = table(evaluation_section(card))
    assert list(rows) == ["base (bfloat16)", "int4 (this model)"]
    for label, row in (("int4 (this model)", int4), ("base (bfloat16)", base)):
        cells = rows[label]
        assert cells["mean cosine to the base's vectors"] == figure(row["cos_mean"])
        assert cells["least cosine to the base's vectors"] == figure(row["cos_min"])
        assert cells[f"NN@{k} agreement with the base model"] == f"{100 * row['nn_agreement']:.2f}%"
        assert cells["encode, sequences/s"] == figure(row["encode_seq_s"], row["encode_sd"], "rate")
        assert cells["on disk"] == card_module.human_bytes(row["disk_bytes"])
        assert "perplexity" not in cells
    section = evaluation_section(card)
    assert f"sha256 {results['dataset']['sha256']}" in section
    assert card_module.md_escape(results["verdict"]["text"]) in section

    meta = front_matter(card)
    assert meta["pipeline_tag"] == "feature-extraction"
    assert meta["model-index"][0]["results"][0]["task"] == {"type": "feature-extraction"}
    metrics = hub_metrics(card)
    assert {name: result.metric_value for name, result in metrics.items()} == {
        "Mean cosine to the base model's sentence vectors (int4)": int4["cos_mean"],
        "Least cosine to the base model's sentence vectors (int4)": int4["cos_min"],
        f"NN@{k} agreement with the base model (int4)": int4["nn_agreement"],
        "Encode speed, sequences/s (int4)": int4["encode_seq_s"],
        "Checkpoint size on disk, bytes (int4)": int4["disk_bytes"],
        "Encode speed, sequences/s (base model, bfloat16)": base["encode_seq_s"],
        "Checkpoint size on disk, bytes (base model, bfloat16)": base["disk_bytes"],
    }


def test_masked_lm_figures(tmp_path):
    """A masked-LM run: pseudo-perplexity with its error, KLD and top-1 on the masked tokens."""
    results = json.loads(ENCODER_RESULTS.read_text())
    results["task"] = "masked-lm"
    results["method"] = {"pppl_method": "pseudo-perplexity", "ctx": 128, "windows": 8, "tokens_masked": 150,
                         "mask_rate": 0.15, "mask_seed": 0, "dtype": "bf16", "speed_runs": 3,
                         "encode_batch": 32, "encode_length": 128, "kld": "KL(base || variant)"}  # fmt: skip
    for i, row in enumerate(results["rows"]):
        row.update(
            pppl=4.0 + i,
            pppl_err=0.1 * (i + 1),
            kld_mean=0.01 * i,
            kld_err=0.001,
            top1_agreement=1 - 0.01 * i,
        )
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    text = render_card(
        base_model=BASE,
        base_config=config,
        report=make_report(),
        results=results,
        variant="nf4",
        repo_id=REPO,
    )
    nf4 = row_of(results, "nf4")
    cells = table(evaluation_section(text))["nf4 (this model)"]
    assert cells["pseudo-perplexity"] == figure(nf4["pppl"], nf4["pppl_err"])
    assert (
        cells["top-1 agreement with the base model (masked tokens)"] == f"{100 * nf4['top1_agreement']:.2f}%"
    )
    assert "150 tokens masked (15% per window, seed 0)" in evaluation_section(text)
    metrics = hub_metrics(text)
    assert metrics["Pseudo-perplexity (nf4)"].metric_value == nf4["pppl"]
    assert metrics["Pseudo-perplexity (nf4)"].task_type == "fill-mask"
    assert (
        metrics["Mean KL divergence to the base model on masked tokens, nats/token (nf4)"].metric_value
        == nf4["kld_mean"]
    )


def test_missing_row_is_one_line_naming_the_file_and_the_fix(tmp_path, hub, capsys):
    results = json.loads(DECODER_RESULTS.read_text())
    results["rows"] = [row for row in results["rows"] if row["variant"] != "int4"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    folder = make_variant(tmp_path / "q4")
    assert main(["push", str(folder), "--repo-id", REPO, "--results", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hubquant: error: ") and err.count("\n") == 1, err
    assert f"{path} has no row for q4 or int4 (its rows: base, nf4, int8)" in err and "--results" in err
    assert [name for api in hub.made for name, _ in api.calls] == []  # nothing sent

    # Found beside OUT/variants/int4 without the row (the eval has not got there): pushed without figures.
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    folder = make_variant(out / "variants" / "int4")
    push(folder, REPO)
    card = uploaded_card(hub)
    assert "## Evaluation" not in card and "model-index" not in front_matter(card)


def test_a_row_of_other_settings_is_refused(tmp_path, capsys):
    report = make_report()
    report.settings["group_size"] = 64
    folder, _ = eval_out(tmp_path, DECODER_RESULTS, report=report)
    assert main(["push", str(folder), "--repo-id", REPO, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was measured with group_size=128" in err and "group_size=64" in err, err


@pytest.mark.parametrize("results", ["missing.json", "bad.json"])
def test_unreadable_results_is_one_line(tmp_path, quantized, results, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert (
        main(["push", str(quantized), "--repo-id", REPO, "--results", str(tmp_path / results), "--dry-run"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / results) in err, err


def test_dry_run_shows_the_card_with_the_figures(tmp_path, capsys):
    int8 = QuantReport("int8", {}, "torchao", "0.18.0", make_report(None).layers)
    folder, results = eval_out(tmp_path, DECODER_RESULTS, variant="int8", report=int8)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(["push", str(folder), "--repo-id", REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"figures in the card: int8 and the base, from {folder.parent.parent / 'results.json'}" in out
    card = out.split("README.md:\n", 1)[1]
    assert "| int8 (this model) |" in card and "model-index:" in card
    assert hub_metrics(card)["Perplexity (int8)"].metric_value == row_of(results, "int8")["ppl"]
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    assert main(["push", str(make_variant(tmp_path / "alone")), "--repo-id", REPO, "--dry-run"]) == 0
    assert "figures in the card: none" in capsys.readouterr().out


def test_figures_added_at_push_are_those_render_card_writes(tmp_path):
    """`add_evaluation` on a card written without figures gives the card written with them; run
    again it replaces its own section; hand edits elsewhere in the card are kept."""
    from hubquant.quantize.card import add_evaluation

    results = json.loads(DECODER_RESULTS.read_text())
    plain = render_card(base_model=BASE, base_config=BASE_CONFIG, report=make_report(), repo_id=REPO)
    full = render_card(
        base_model=BASE,
        base_config=BASE_CONFIG,
        report=make_report(),
        repo_id=REPO,
        results=results,
        variant="int4",
    )
    assert add_evaluation(plain, results, "int4", repo_id=REPO) == full
    assert add_evaluation(full, results, "int4", repo_id=REPO) == full
    edited = plain.replace("## How to use", "A note of ours.\n\n## How to use")
    again = add_evaluation(edited, results, "int4", repo_id=REPO)
    assert "A note of ours.\n\n## Evaluation" in again and again.count("## Evaluation") == 1
    bare = add_evaluation("# My card\n", results, "int4")
    assert bare.startswith("---\nmodel-index:\n") and "\n# My card\n\n## Evaluation\n" in bare
    with pytest.raises(ValueError, match="no figures of fp8"):
        add_evaluation(plain, results, "fp8")


@pytest.mark.parametrize(
    "error",
    [
        lambda: __import__("httpx2").ConnectError("[Errno -2] Name or service not known"),
        lambda: __import__("httpx2").ReadTimeout("timed out"),
        lambda: __import__("requests").exceptions.ConnectionError("refused"),
        lambda: TimeoutError("timed out"),
        lambda: socket.gaierror(-2, "Name or service not known"),
    ],
)
def test_push_and_downloads_share_one_map_of_network_errors(error):
    """What downloads call "cannot reach the Hub", push does too (hubquant.models.hub.transport_failure)."""
    from hubquant.models.hub import _hub_errors
    from hubquant.quantize.push import _hub_error

    with pytest.raises(HubquantError) as download, _hub_errors("org/tiny", None):
        raise error()
    assert download.value.args[0].startswith("cannot reach the Hub at "), download.value
    pushed = str(_hub_error(error(), REPO, None, []))
    assert pushed.startswith("cannot reach the Hugging Face Hub (no connection: "), pushed
