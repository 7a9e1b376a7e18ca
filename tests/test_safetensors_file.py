"""Our plain-read safetensors reader against the safetensors library's own writer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hubquant.errors import HubquantError
from hubquant.models.safetensors_file import SafetensorsFile


def test_reads_back_every_dtype_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=gen).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "pt"}
        for name, want in tensors.items():
            for got in (f.read(name), f.map(name)):
                assert got.dtype == want.dtype and got.shape == want.shape == f.shape(name)
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        mapped = f.map("f32")
    # The map outlives the file object, and writes to it never reach the file.
    mapped.add_(1.0)
    assert torch.equal(mapped, tensors["f32"] + 1.0)
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read("f32"), tensors["f32"])


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_files_are_refused_on_open(tmp_path, cut):
    save_file({"w": torch.randn(64)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:cut])
    with pytest.raises(HubquantError, match="truncated or corrupt"):
        SafetensorsFile(tmp_path / "x.safetensors")
