"""`load()`: any supported Hub checkpoint into the canonical decoder and its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import load_weights, read_config, read_json, shard_files
from .decoder import Decoder
from .families import family_for
from .hub import resolve
from .tokenizer import Tokenizer


def load(
    source: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Decoder, Tokenizer | None]:
    """Load a checkpoint into hubquant's canonical decoder.

    Args:
        source: a Hub repo id ("HuggingFaceTB/SmolLM2-135M") or a local Hub-layout folder.
        revision: Hub branch, tag or commit.
        dtype: parameter dtype; tensors are cast one by one as they stream in.
        device: where the model lives.
        progress: show a progress bar while loading.

    Returns:
        `(model, tokenizer)`, the model in eval mode; tokenizer is None when the checkpoint ships
        no tokenizer.json.
    """
    folder = resolve(source, revision)
    hf_config = read_config(folder)
    shards = shard_files(folder)  # refuse pickle-only or weightless folders before anything else
    family = family_for(hf_config)
    gen_path = folder / "generation_config.json"
    gen_config = read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    cfg = family.config(hf_config)
    gen_eos = gen_config.get("eos_token_id")
    if gen_eos is not None:
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*extra, *cfg.eos_token_ids])))

    with torch.device("meta"):
        model = Decoder(cfg)
    load_weights(
        model,
        family,
        folder,
        dtype=dtype,
        device=device,
        tie_embeddings=cfg.tie_embeddings,
        progress=progress,
        shards=shards,
    )
    model.eval()
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(folder, hf_config, gen_config)
    return model, tokenizer
