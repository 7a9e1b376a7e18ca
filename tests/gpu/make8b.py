"""A random-weight checkpoint with Apertus-8B's shapes, written fast, for GPU benchmarks.

usage: python make8b.py OUT TOKDIR [LAYERS]

Hidden 4096, LAYERS layers (default 32), 32 heads, 8 KV heads, MLP 21504, vocab 131072, llama3 RoPE
as Apertus uses it. The tensor names and shapes come from transformers' model built on the meta
device (ApertusForCausalLM, or LlamaForCausalLM where transformers has no Apertus); the values are
seeded normal noise (std 0.02, bf16), norm weights ones, small parameters (xIELU's) copied from a
tiny model of the same class at its init. Written as ~5 GB safetensors shards with an index,
config.json, generation_config.json and the tokenizer files of TOKDIR. Random numbers are drawn on
the GPU when there is one (much faster), then moved to the CPU to be written.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHARD_BYTES = 5 * 10**9
STD = 0.02
ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}
ROPE_THETA = 12_000_000.0
SHAPES = dict(
    vocab_size=131072,
    hidden_size=4096,
    intermediate_size=21504,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("tokdir", type=Path, help="folder with tokenizer.json and tokenizer_config.json")
    parser.add_argument("layers", type=int, nargs="?", default=32, help="decoder layers (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def special_ids(tokdir: Path) -> dict[str, int]:
    """bos/eos/pad ids of the carried tokenizer (its tokenizer_config names, tokenizer.json's added
    tokens give the ids), so that the checkpoint's config agrees with its tokenizer."""
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    try:
        added = json.loads((tokdir / "tokenizer.json").read_text()).get("added_tokens", [])
        by_text = {t["content"]: t["id"] for t in added}
        config = json.loads((tokdir / "tokenizer_config.json").read_text())
    except (OSError, ValueError, KeyError):
        return ids
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in by_text:
            ids[f"{key}_token_id"] = by_text[token]
    return ids


def make_config(layers: int, tokdir: Path) -> tuple[Any, type]:
    """(the config, the model class): Apertus where transformers has it, else Llama, same shapes."""
    import transformers

    if hasattr(transformers, "ApertusConfig"):
        config_cls, model_cls = transformers.ApertusConfig, transformers.ApertusForCausalLM
    else:
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    kwargs: dict[str, Any] = {**SHAPES, **special_ids(tokdir), "num_hidden_layers": layers}
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers 5
        kwargs["rope_parameters"] = {**ROPE, "rope_theta": ROPE_THETA}
    else:
        kwargs.update(rope_theta=ROPE_THETA, rope_scaling=dict(ROPE))
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    if hasattr(config, "dtype"):
        config.dtype = torch.bfloat16
    else:
        config.torch_dtype = torch.bfloat16
    return config, model_cls


def layer_free(name: str) -> str:
    """A tensor name without its layer index: 'model.layers.7.mlp.x' -> 'model.layers.mlp.x'."""
    return re.sub(r"\.layers\.\d+\.", ".layers.", name)


def small_tensors(config: Any, model_cls: type) -> dict[str, torch.Tensor]:
    """Tensors of under 8 elements (xIELU's alpha/beta/eps) at their init values, by layer-free name,
    from a one-layer model of the same class and tiny width."""
    tiny = type(config)(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = model_cls(tiny)
    return {layer_free(k): v.detach().clone() for k, v in model.state_dict().items() if v.numel() < 8}


def meta_shapes(config: Any, model_cls: type) -> dict[str, torch.Size]:
    """Every state-dict name and shape of the full model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def make_tensor(
    name: str, shape: torch.Size, small: dict[str, torch.Tensor], gen: torch.Generator, device: str
) -> torch.Tensor:
    """Noise for matrices, ones for norm weights, init values for small parameters, zeros else."""
    key = layer_free(name)
    if key in small and small[key].shape == shape:
        return small[key].to(device, torch.bfloat16)
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(STD)
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, device=device, dtype=torch.bfloat16)
    return torch.zeros(shape, device=device, dtype=torch.bfloat16)


class ShardWriter:
    """Collects tensors and writes a numbered shard each time SHARD_BYTES are reached."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.total += size
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(
            {k: v.cpu().contiguous() for k, v in self.pending.items()}, self.out / name, {"format": "pt"}
        )
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, give the shards their Hub names (model-0000i-of-0000n) and the index."""
        self.flush()
        n = len(self.files)
        final = {old: f"model-{i:05d}-of-{n:05d}.safetensors" for i, old in enumerate(self.files, 1)}
        for old, new in final.items():
            (self.out / old).rename(self.out / new)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())},
        }
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_side_files(config: Any, out: Path, tokdir: Path) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokdir / name).is_file():
            shutil.copy(tokdir / name, out / name)


def main() -> int:
    args = parse_args()
    start = time.perf_counter()
    if not (args.tokdir / "tokenizer.json").is_file():
        print(f"no tokenizer.json in {args.tokdir}")
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, model_cls = make_config(args.layers, args.tokdir)
    shapes = meta_shapes(config, model_cls)
    small = small_tensors(config, model_cls)
    args.out.mkdir(parents=True, exist_ok=True)
    # config.json is written last: a folder that has one is complete
    for stale in [*args.out.glob("*.safetensors"), *args.out.glob("*.json")]:
        stale.unlink()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    writer = ShardWriter(args.out)
    for name, shape in shapes.items():
        writer.add(name, make_tensor(name, shape, small, gen, device))
    writer.finish()
    write_side_files(config, args.out, args.tokdir)
    print(
        f"wrote {model_cls.__name__} with {args.layers} layers: {writer.total / 1e9:.2f} GB in "
        f"{len(writer.files)} shards to {args.out}, random numbers on {device}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
