"""Our plain-read safetensors reader against the library's writer, our writer against its reader.

The fuzz comparing the reader with the library on mutated files: test_fuzz_safetensors.py.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hubquant.errors import HubquantError
from hubquant.models.safetensors_file import DTYPES, SafetensorsFile, SafetensorsWriter


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


def test_rows_read_a_slice_of_dim_0(tmp_path):
    w = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    save_file({"w": w}, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read("w", rows=(2, 5)), w[2:5])


def test_refusals_are_one_line_naming_the_file_and_quote_names_safely(tmp_path):
    path = tmp_path / "x.safetensors"
    # A name with a newline and an escape sequence, on a dtype torch has no equivalent for.
    header = json.dumps({"a\n\x1b[31mb": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"abc")
    with pytest.raises(HubquantError) as error:
        SafetensorsFile(path)
    message = str(error.value)
    assert str(path) in message and "F6_E2M3" in message and "\\n" in message
    assert not any(c in message for c in "\n\r\x1b"), message
    # The library's own reason, made one line: an unknown dtype quoted back from the header.
    header = json.dumps({"a": {"dtype": "X\nY", "shape": [1], "data_offsets": [0, 1]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"a")
    with pytest.raises(HubquantError, match="truncated or corrupt") as error:
        SafetensorsFile(path)
    assert "\n" not in str(error.value) and "unknown variant" in str(error.value)


def test_gapped_and_overlapping_offsets_are_refused(tmp_path):
    """Two of the kinds of file the old reader accepted and the library refuses."""
    path = tmp_path / "x.safetensors"
    for a, b, size in [((0, 4), (8, 12), 12), ((0, 8), (4, 12), 12)]:
        header = json.dumps(
            {
                "a": {"dtype": "F32", "shape": [(a[1] - a[0]) // 4], "data_offsets": list(a)},
                "b": {"dtype": "F32", "shape": [(b[1] - b[0]) // 4], "data_offsets": list(b)},
            }
        )
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(size))
        with pytest.raises(HubquantError, match="invalid offset for tensor `b`"):
            SafetensorsFile(path)


# -- the writer -----------------------------------------------------------------------------


def _write(path, tensors, metadata=None):
    writer = SafetensorsWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], metadata)
    for t in tensors.values():
        writer.write(t)
    writer.close()


def test_writer_round_trips_every_dtype_through_the_library(tmp_path):
    gen = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (24,), dtype=torch.uint8, generator=gen)
    tensors = {
        "f32": torch.randn(3, 2, generator=gen),
        "bf16": torch.randn(5, generator=gen).bfloat16(),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "caf\u00e9\u0000": torch.arange(4, dtype=torch.int8),
        **{
            code.lower(): raw[: 2 * DTYPES[code].itemsize].view(DTYPES[code]).reshape(2, -1)
            for code in ("F4", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "U16", "U32", "U64", "C64")
        },
    }
    path = tmp_path / "x.safetensors"
    _write(path, tensors, metadata={"format": "pt", "n\u00e9": "v\n"})
    with safe_open(path, framework="pt") as lib, SafetensorsFile(path) as ours:
        assert lib.metadata() == ours.metadata == {"format": "pt", "n\u00e9": "v\n"}
        assert sorted(lib.keys()) == sorted(ours.keys()) == sorted(tensors)
        for name, want in tensors.items():
            for got in (lib.get_tensor(name), ours.read(name), ours.map(name)):
                assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
                assert bytes(got.reshape(-1).view(torch.uint8).numpy()) == bytes(
                    want.reshape(-1).view(torch.uint8).numpy()
                ), name
    # F4 is stored in pairs: the header holds the logical shape, twice the last dimension.
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert json.loads(path.read_bytes()[8 : 8 + length])["f4"]["shape"] == [2, 2]


@pytest.mark.parametrize(
    ("entries", "metadata", "expected"),
    [
        ([("a", (1,), torch.float32), ("a", (1,), torch.float32)], None, "not a new UTF-8 name"),
        ([("__metadata__", (1,), torch.float32)], None, "not a new UTF-8 name"),
        ([("\ud800", (1,), torch.float32)], None, "not a new UTF-8 name"),
        ([(3, (1,), torch.float32)], None, "not a new UTF-8 name"),
        ([("a", (-1,), torch.float32)], None, "not non-negative ints"),
        ([("a", (True,), torch.float32)], None, "not non-negative ints"),
        ([("a", (1.0,), torch.float32)], None, "not non-negative ints"),
        ([("a", (2**63,), torch.float32)], None, "not non-negative ints"),
        ([("a", (2**62, 2**62, 0), torch.float32)], None, "too large for the format"),
        ([("a", 5, torch.float32)], None, "not non-negative ints"),
        ([("a", (1,), torch.complex128)], None, "safetensors cannot store"),
        ([("a", (1,), "float32")], None, "safetensors cannot store"),
        ([("a", (), torch.float4_e2m1fn_x2)], None, "no dimension to hold its pairs"),
        ([("a", (1,), torch.float32)], {"k": 1}, "UTF-8 strings"),
        ([("a", (1,), torch.float32)], {"k": "\udc80"}, "UTF-8 strings"),
    ],
)
def test_writer_refuses_what_the_library_could_not_read_and_writes_nothing(
    tmp_path, entries, metadata, expected
):
    path = tmp_path / "x.safetensors"
    with pytest.raises(HubquantError, match=expected) as error:
        SafetensorsWriter(path, entries, metadata)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not path.exists()


def test_writer_checks_each_write_against_its_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    entries = [("a", (2,), torch.float32), ("z", (0,), torch.int8), ("b", (2,), torch.float16)]
    writer = SafetensorsWriter(path, entries)
    writer.write(torch.zeros(1))  # rows of a tensor, one write at a time
    writer.write(torch.zeros(1))
    writer.write(torch.zeros(0, dtype=torch.int8))  # an empty tensor: nothing to check
    with pytest.raises(HubquantError, match="do not fit tensor b"):
        writer.write(torch.zeros(1))  # float32 bytes where float16 ones are announced
    with pytest.raises(HubquantError, match="do not fit tensor b"):
        writer.write(torch.zeros(3, dtype=torch.float16))  # more than announced
    writer.write(torch.ones(2, dtype=torch.float16))
    with pytest.raises(HubquantError, match="do not fit"):
        writer.write(torch.zeros(1))  # past the last tensor
    writer.close()
    with SafetensorsFile(path) as f:
        assert torch.equal(f.read("b"), torch.ones(2, dtype=torch.float16))


def test_incomplete_files_are_removed_on_close(tmp_path):
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [("a", (4,), torch.float32)])
    writer.write(torch.zeros(2))
    with pytest.raises(HubquantError, match="wrote 8 of 16 announced bytes"):
        writer.close()
    assert not path.exists()
    writer.close()  # closing twice is harmless
    # The cleanup path of a failed run (check=False) removes an incomplete file without a word...
    writer = SafetensorsWriter(path, [("a", (4,), torch.float32)])
    writer.write(torch.zeros(2))
    writer.close(check=False)
    assert not path.exists()
    # ...and keeps a complete one.
    writer = SafetensorsWriter(path, [("a", (4,), torch.float32)])
    writer.write(torch.zeros(4))
    writer.close(check=False)
    assert torch.equal(load_file(path)["a"], torch.zeros(4))


def test_a_finished_file_the_library_refuses_is_removed(tmp_path, monkeypatch):
    import hubquant.models.safetensors_file as module

    path = tmp_path / "x.safetensors"
    seen = []
    monkeypatch.setattr(
        module, "library_problem", lambda p: seen.append(p) or "invalid offset for tensor `a`"
    )
    writer = SafetensorsWriter(path, [("a", (1,), torch.float32)])
    writer.write(torch.zeros(1))
    with pytest.raises(HubquantError, match="invalid offset for tensor `a`; the file was removed"):
        writer.close()
    assert seen == [path] and not path.exists()
