"""Fuzz: `read_gguf` on mutated GGUF files. Every file is read into a checkpoint or refused with one
line that names it: no other exception, no hang, no allocation beyond the file's size.

Four small valid files (llama, gemma, phi2, apertus; written with gguf-py's `GGUFWriter`) are
mutated where a reader can go wrong: counts, string and array lengths, value and tensor types,
dimensions, tensor offsets, key names, scalar values (absurd sizes, wrong types of the same width),
truncation and bit flips. Where hubquant's own header scan accepts a file, it must read exactly what
gguf-py's `GGUFReader` reads from it (the scan replaces the reader: see `hubquant.convert.gguf`).
"""

from __future__ import annotations

import random
import signal
import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from hubquant.convert.gguf import _GGUFFile, _open, read_gguf
from hubquant.errors import HubquantError
from hubquant.models.families import family_for

pytestmark = pytest.mark.filterwarnings("ignore")

SEED = 11
CASES_PER_BASE = 550  # x 4 bases = 2,200 mutated files
CASE_SECONDS = 10  # any single file taking longer is a hang
TOTAL_SECONDS = 60  # the whole fuzz, on the 2-core development machine ~15 s

V = GGUFValueType
_SCALAR_SIZE = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
                V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}  # fmt: skip
K = gguf.Keys


# ----------------------------------------------------------------------------------------------------
# Valid base files


def _gpt2_vocab() -> dict[str, tuple[Any, GGUFValueType]]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    tokens = [table[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>"]
    return {
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("gpt-2", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.STRING),
        "tokenizer.ggml.token_type": ([1] * 259 + [3, 3], V.INT32),
        "tokenizer.ggml.merges": (["Ġ t", "h e", "Ġt he"], V.STRING),
        "tokenizer.ggml.bos_token_id": (259, V.UINT32),
        "tokenizer.ggml.eos_token_id": (259, V.UINT32),
    }


def _spm_vocab() -> dict[str, tuple[Any, GGUFValueType]]:
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "▁t", "he", "▁the", "an", "▁and"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    return {
        "tokenizer.ggml.model": ("llama", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.STRING),
        "tokenizer.ggml.scores": ([0.0] * 259 + [-float(i) for i in range(len(pieces))], V.FLOAT32),
        "tokenizer.ggml.token_type": ([2, 3, 3] + [6] * 256 + [1] * len(pieces), V.INT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.chat_template": ("{{ messages }}", V.STRING),
    }


_HF = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "phi2": "PhiForCausalLM",
       "apertus": "ApertusForCausalLM"}  # fmt: skip
_LAYERS = 2


def _write_base(path: Path, arch: str) -> Path:
    """A tiny valid GGUF of `arch`: hidden 32, 4 heads (2 kv), 2 blocks, one Q8_0 tensor (llama).
    Tensor names come from gguf-py's `TensorNameMap`, shapes from the family's Hub layout."""
    vocab = _spm_vocab() if arch == "llama" else _gpt2_vocab()
    n_vocab = len(vocab["tokenizer.ggml.tokens"][0])
    kv_heads = 4 if arch == "phi2" else 2
    hf = {"architectures": [_HF[arch]], "vocab_size": n_vocab, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": _LAYERS, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
          "head_dim": 8, "max_position_embeddings": 64, "tie_word_embeddings": arch == "gemma"}  # fmt: skip
    if arch == "phi2":
        del hf["head_dim"]
    family = family_for(hf)
    a = f"{arch}."
    meta: dict[str, tuple[Any, GGUFValueType]] = {
        a + "context_length": (64, V.UINT32),
        a + "embedding_length": (32, V.UINT32),
        a + "block_count": (_LAYERS, V.UINT32),
        a + "feed_forward_length": (64, V.UINT32),
        a + "attention.head_count": (4, V.UINT32),
        a + "attention.head_count_kv": (kv_heads, V.UINT32),
        a + "rope.freq_base": (10000.0, V.FLOAT32),
        a + "rope.dimension_count": (4 if arch == "phi2" else 8, V.UINT32),
        (a + "attention.layer_norm_epsilon" if arch == "phi2" else a + "attention.layer_norm_rms_epsilon"): (
            1e-5,
            V.FLOAT32,
        ),
        **vocab,
    }
    if arch == "gemma":
        meta[a + "attention.key_length"] = (8, V.UINT32)
    if arch == "apertus":
        for key in (K.xIELU.ALPHA_P, K.xIELU.ALPHA_N, K.xIELU.BETA, K.xIELU.EPS):
            meta[key] = ([0.5, 0.25], V.FLOAT32)
    arch_enum = next(e for e, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.TensorNameMap(arch_enum, _LAYERS)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in meta.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, V.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    for hub_name, shape in family.hub_shapes(hf).items():
        if ".act_fn." in hub_name:
            continue  # Apertus' xIELU parameters: metadata in GGUF
        gguf_name = names.get_name(hub_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hub_name
        values = rng.standard_normal(shape).astype(np.float32)
        if arch == "llama" and gguf_name == "blk.0.ffn_up.weight":
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------------------------------
# Where the header's fields lie in a valid file (an independent walker, for the mutations)


@dataclass
class Layout:
    u64: dict[str, list[int]] = field(default_factory=dict)  # kind -> offsets of u64 fields
    u32: dict[str, list[int]] = field(default_factory=dict)  # kind -> offsets of u32 fields
    scalars: list[tuple[int, GGUFValueType]] = field(default_factory=list)  # metadata scalar values
    keys: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of key names
    names: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of tensor names
    header_end: int = 0

    def add(self, table: dict[str, list[int]], kind: str, offset: int) -> None:
        table.setdefault(kind, []).append(offset)


def _layout(data: bytes) -> Layout:
    out, pos = Layout(), 8

    def u32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", data, pos - 4)[0]

    def u64() -> int:
        nonlocal pos
        pos += 8
        return struct.unpack_from("<Q", data, pos - 8)[0]

    def string(kind: str) -> tuple[int, int]:
        nonlocal pos
        out.add(out.u64, kind, pos)
        length = u64()
        pos += length
        return pos - length, length

    out.add(out.u64, "count", pos)
    n_tensors = u64()
    out.add(out.u64, "count", pos)
    n_kv = u64()
    for _ in range(n_kv):
        out.keys.append(string("key length"))
        out.add(out.u32, "value type", pos)
        vtype = V(u32())
        if vtype == V.STRING:
            string("string length")
        elif vtype == V.ARRAY:
            out.add(out.u32, "element type", pos)
            item = V(u32())
            out.add(out.u64, "array length", pos)
            count = u64()
            for _ in range(count):
                if item == V.STRING:
                    string("element length")
                else:
                    pos += _SCALAR_SIZE[item]
        else:
            out.scalars.append((pos, vtype))
            pos += _SCALAR_SIZE[vtype]
    for _ in range(n_tensors):
        out.names.append(string("tensor name length"))
        out.add(out.u32, "n_dims", pos)
        n_dims = u32()
        for _ in range(n_dims):
            out.add(out.u64, "dimension", pos)
            pos += 8
        out.add(out.u32, "tensor type", pos)
        pos += 4
        out.add(out.u64, "tensor offset", pos)
        pos += 8
    out.header_end = pos
    return out


# ----------------------------------------------------------------------------------------------------
# Mutations


def _u64_values(old: int, rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 255, old - 1, old + 1, old * 2, old + 32, 2**31, 2**32 - 1, 2**32,
                       2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1, rng.randrange(2**64)]) % 2**64  # fmt: skip


def _u32_values(old: int, rng: random.Random) -> int:
    return rng.choice([*range(14), 24, 30, 31, 39, 41, 99, 255, old + 1, 2**31, 2**32 - 1,
                       rng.randrange(2**32)]) % 2**32  # fmt: skip


_SAME_WIDTH = {1: [V.UINT8, V.INT8, V.BOOL], 4: [V.UINT32, V.INT32, V.FLOAT32],
               8: [V.UINT64, V.INT64, V.FLOAT64]}  # fmt: skip


def mutate(data: bytes, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a valid file, and its kind."""
    buf = bytearray(data)
    kind = rng.choice(["u64", "u64", "u32", "u32", "scalar", "retype", "key", "truncate", "flip", "flip",
                       "swap"])  # fmt: skip
    if kind == "u64":
        what = rng.choice(sorted(layout.u64))
        pos = rng.choice(layout.u64[what])
        struct.pack_into("<Q", buf, pos, _u64_values(struct.unpack_from("<Q", buf, pos)[0], rng))
        return bytes(buf), what
    if kind == "u32":
        what = rng.choice(sorted(layout.u32))
        pos = rng.choice(layout.u32[what])
        struct.pack_into("<I", buf, pos, _u32_values(struct.unpack_from("<I", buf, pos)[0], rng))
        return bytes(buf), what
    if kind == "scalar":  # absurd values for sizes, ids, flags, epsilons: zero, huge, negative, NaN
        pos, vtype = rng.choice(layout.scalars)
        size = _SCALAR_SIZE[vtype]
        if vtype in (V.FLOAT32, V.FLOAT64):
            value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30])
            struct.pack_into("<f" if size == 4 else "<d", buf, pos, value)
        else:
            raw = rng.choice(
                [0, 1, 2, 3, 5, 7, 2**size * 4, 2 ** (8 * size) - 1, rng.randrange(2 ** (8 * size))]
            )
            buf[pos : pos + size] = (raw % 2 ** (8 * size)).to_bytes(size, "little")
        return bytes(buf), "scalar value"
    if kind == "retype":  # a value of the wrong type but the same width: the file still parses
        pos, vtype = rng.choice(layout.scalars)
        struct.pack_into("<I", buf, pos - 4, rng.choice(_SAME_WIDTH[_SCALAR_SIZE[vtype]]))
        return bytes(buf), "wrong value type"
    if kind == "key":  # rename a key or tensor: a duplicate, an unknown name, a line break, not UTF-8
        table = rng.choice([layout.keys, layout.names])
        (start, length), (other, other_len) = rng.choice(table), rng.choice(table)
        if length == other_len and rng.random() < 0.5:
            buf[start : start + length] = data[other : other + length]
        elif length:
            buf[start + rng.randrange(length)] = rng.choice(
                [0x00, 0x0A, 0x0D, 0x2E, 0xC3, 0xFF, rng.randrange(256)]
            )
        return bytes(buf), "key or tensor name"
    if kind == "truncate":
        cut = rng.randrange(layout.header_end + 64) if rng.random() < 0.6 else rng.randrange(len(data))
        return bytes(buf[:cut]), "truncate"
    if kind == "swap":  # swap two 8-byte words of the header: counts, lengths, offsets exchanged
        a, b = rng.randrange(8, layout.header_end - 8), rng.randrange(8, layout.header_end - 8)
        buf[a : a + 8], buf[b : b + 8] = data[b : b + 8], data[a : a + 8]
        return bytes(buf), "swap"
    end = layout.header_end if rng.random() < 0.8 else len(data)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return bytes(buf), "bit flip"


# ----------------------------------------------------------------------------------------------------
# The checks


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(path: Path) -> str:
    """ "read" or "refused"; anything else raises (and fails the test with the file kept)."""
    try:
        with time_limit(CASE_SECONDS):
            source = read_gguf(path)
            for info in source.tensors[:3]:
                source.read(info.name)
        return "read"
    except HubquantError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message, f"multi-line error for {path}: {message!r}"
        assert str(path) in message, f"error does not name {path}: {message}"
        return "refused"


def same_as_gguf_py(path: Path) -> None:
    """What hubquant's scan found equals what gguf-py's reader reads from the same file."""
    ours, theirs = _GGUFFile(path), GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields), path
    for key, field_ in fields.items():
        assert tuple(ours.fields[key].types) == tuple(field_.types), key
        try:
            expected = field_.contents()
        except UnicodeDecodeError:
            with pytest.raises(HubquantError):
                ours.value(key)
            continue
        got = ours.value(key)
        if isinstance(expected, float) or (
            isinstance(expected, list) and expected and isinstance(expected[0], float)
        ):
            np.testing.assert_array_equal(np.array(got), np.array(expected), err_msg=key)  # NaN-aware
        else:
            assert got == expected, key
    assert ours.alignment == theirs.alignment and ours.data_offset == theirs.data_offset
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            ref.name, ref.tensor_type, ref.n_elements, ref.n_bytes, ref.data_offset)  # fmt: skip
        assert mine.shape.tolist() == ref.shape.tolist()
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert mine.data.tobytes() == ref.data.tobytes(), mine.name


def scan_accepts(path: Path) -> bool:
    try:
        _open(path)
        return True
    except HubquantError:
        return False


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("gguf-bases")
    return {arch: _write_base(folder / f"{arch}.gguf", arch).read_bytes() for arch in _HF}


def test_bases_are_valid_and_read_as_gguf_py_reads_them(bases: dict[str, bytes], tmp_path: Path) -> None:
    for arch, data in bases.items():
        path = tmp_path / f"{arch}.gguf"
        path.write_bytes(data)
        assert outcome(path) == "read", arch
        same_as_gguf_py(path)


def test_fuzz_mutated_gguf_files(bases: dict[str, bytes], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    counts: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    compared = 0
    start, cpu = time.perf_counter(), time.process_time()
    for arch, data in bases.items():
        layout = _layout(data)
        for case in range(CASES_PER_BASE):
            mutated, kind = mutate(data, layout, rng)
            path = tmp_path / f"{arch}-{case}.gguf"
            path.write_bytes(mutated)
            result = outcome(path)
            counts[result] += 1
            by_kind[(kind, result)] += 1
            # Where our scan accepts a changed header, gguf-py must read the same from it (every
            # other case: gguf-py's reader is the slow part of this test).
            changed = mutated[: layout.header_end] != data[: layout.header_end]
            if changed and case % 2 == 0 and scan_accepts(path):
                same_as_gguf_py(path)
                compared += 1
            path.unlink()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    total = sum(counts.values())
    summary = (
        f"{total} mutated GGUF files in {elapsed:.1f} s ({cpu:.1f} s CPU): {counts['read']} read, {counts['refused']} refused "
        f"in one line, 0 other outcomes; {compared} accepted headers compared with gguf-py, 0 differences"
    )
    print(summary)
    for kind in sorted({k for k, _ in by_kind}):
        print(f"  {kind:20s} read {by_kind[(kind, 'read')]:4d}  refused {by_kind[(kind, 'refused')]:4d}")
    assert total >= 2000, summary
    # Not vacuous: damage is refused, harmless changes are read, and accepted headers were compared.
    assert counts["refused"] > total // 3 and counts["read"] > total // 20, summary
    assert compared > 50, summary
    assert elapsed < TOTAL_SECONDS, summary


# ----------------------------------------------------------------------------------------------------
# Targeted: oversized counts, wrong types, the old reader's failures


def _patched(data: bytes, pos: int, fmt: str, value: Any) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, pos, value)
    return bytes(buf)


def _refusal(path: Path) -> str:
    with pytest.raises(HubquantError) as info:
        with time_limit(CASE_SECONDS):
            read_gguf(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_oversized_counts_refused_without_allocating(bases: dict[str, bytes], tmp_path: Path) -> None:
    """A count of 2^60 (tensors, keys, array elements, string bytes, dimensions) is refused before
    anything is allocated for it: peak traced memory stays below the file's own size."""
    data = bases["llama"]
    layout = _layout(data)
    tokens_at = next(pos for pos, (start, n) in zip(layout.u64["key length"], layout.keys, strict=True)
                     if data[start : start + n] == b"tokenizer.ggml.tokens")  # fmt: skip
    array_len = min(p for p in layout.u64["array length"] if p > tokens_at)
    cases = {
        "tensor count": (layout.u64["count"][0], "<Q", 2**60),
        "metadata count": (layout.u64["count"][1], "<Q", 2**60),
        "array length": (array_len, "<Q", 2**60),
        "string length": (layout.u64["string length"][0], "<Q", 2**60),
        "key length": (layout.u64["key length"][3], "<Q", 2**64 - 1),
        "dimension": (layout.u64["dimension"][0], "<Q", 2**40),
        "n_dims": (layout.u32["n_dims"][0], "<I", 2**31),
        "tensor offset": (layout.u64["tensor offset"][-1], "<Q", 2**60),
    }
    for what, (pos, fmt, value) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.gguf"
        path.write_bytes(_patched(data, pos, fmt, value))
        tracemalloc.start()
        try:
            message = _refusal(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"{what}: peak {peak / 1024:.0f} KiB for a {len(data) / 1024:.0f} KiB file: {message}")
        assert peak < len(data), f"{what}: {peak} bytes traced for a {len(data)}-byte file"
        assert "truncated or corrupt" in message, message


def _with_value(data: bytes, layout: Layout, key: bytes, vtype: GGUFValueType) -> bytes:
    """`data` with the scalar `key` retyped to `vtype` (of the same width: the file still parses)."""
    start, n = next((start, n) for start, n in layout.keys if data[start : start + n] == key)
    return _patched(data, start + n, "<I", vtype)  # the value type follows the key


@pytest.mark.parametrize(
    ("key", "vtype", "words"),
    [
        (b"llama.block_count", V.FLOAT32, ["llama.block_count", "FLOAT32", "integer"]),
        (b"llama.attention.head_count", V.INT32, None),  # any integer type is an integer
        (b"llama.rope.freq_base", V.UINT32, ["llama.rope.freq_base", "UINT32", "FLOAT32 or FLOAT64"]),
        (b"tokenizer.ggml.add_bos_token", V.UINT8, ["tokenizer.ggml.add_bos_token", "BOOL"]),
    ],
)
def test_wrong_value_type_names_the_key(bases, tmp_path, key, vtype, words) -> None:
    data = bases["llama"]
    path = tmp_path / "typed.gguf"
    path.write_bytes(_with_value(data, _layout(data), key, vtype))
    if words is None:
        assert outcome(path) == "read"
        return
    message = _refusal(path)
    for word in words:
        assert word in message, message


def _rewritten(tmp_path: Path, arch: str, change: dict[str, tuple[Any, GGUFValueType] | None]) -> Path:
    """The base file of `arch` written again with metadata keys replaced (None: removed)."""
    source = tmp_path / "base.gguf"
    _write_base(source, arch)
    reader = GGUFReader(source)
    out = tmp_path / "changed.gguf"
    writer = gguf.GGUFWriter(str(out), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in change:
            continue
        if f.types[0] == V.ARRAY:
            writer.add_key_value(key, f.contents(), V.ARRAY, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for key, value in change.items():
        if value is not None:
            if isinstance(value[0], list):
                writer.add_key_value(key, value[0], V.ARRAY, sub_type=value[1])
            else:
                writer.add_key_value(key, value[0], value[1])
    for tensor in reader.tensors:
        raw = None if tensor.tensor_type in (GGMLQuantizationType.F32,) else tensor.tensor_type
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


_LONG_TOKEN = [*_spm_vocab()["tokenizer.ggml.tokens"][0][:-1], "a" * 600]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"llama.block_count": ("2", V.STRING)}, ["llama.block_count", "STRING", "integer"]),
        ({"llama.attention.head_count": ([4, 4], V.UINT32)}, ["llama.attention.head_count", "ARRAY"]),
        ({"tokenizer.ggml.tokens": ([1, 2, 3], V.INT32)}, ["tokenizer.ggml.tokens", "ARRAY of STRING"]),
        ({"llama.attention.head_count": (0, V.UINT32)}, ["llama.attention.head_count", "between 1 and"]),
        ({"llama.attention.head_count_kv": (3, V.UINT32)}, ["head_count", "head_count_kv", "(3)"]),
        ({"llama.block_count": (2**31, V.UINT32)}, ["llama.block_count", "4,096"]),
        ({"llama.block_count": (1000, V.UINT32)}, ["llama.block_count", "1000 blocks"]),
        ({"llama.embedding_length": (0, V.UINT64)}, ["llama.embedding_length"]),
        ({"llama.rope.freq_base": (float("nan"), V.FLOAT32)}, ["llama.rope.freq_base", "nan"]),
        ({"llama.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT64)}, ["layer_norm_rms_epsilon"]),
        ({"tokenizer.ggml.merges": (["nospace"], V.STRING)}, ["tokenizer"]),
        ({"general.alignment": (3, V.UINT32)}, ["general.alignment", "power of two"]),
        ({"llama.attention.head_count": None}, ["llama.attention.head_count", "missing"]),
        ({"llama.vocab_size": (100, V.UINT32)}, ["llama.vocab_size", "smaller than the tokenizer's 271"]),
        ({"tokenizer.ggml.tokens": (_LONG_TOKEN, V.STRING)}, ["GGUF token 270 is 600 characters long"]),
    ],
    ids=lambda v: str(v)[:48],
)
def test_wrong_or_absurd_metadata_names_the_key(tmp_path: Path, change, words) -> None:
    message = _refusal(_rewritten(tmp_path, "llama", change))
    for word in words:
        assert word in message, message


def test_big_endian_and_other_versions_refused(bases: dict[str, bytes], tmp_path: Path) -> None:
    data = bases["llama"]
    for version, word in [(3 << 24, "big-endian"), (1, "version 1"), (4, "version 4")]:
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(_patched(data, 4, "<I", version))
        assert word in _refusal(path)


def test_overlapping_tensors_refused_though_gguf_py_reads_them(
    bases: dict[str, bytes], tmp_path: Path
) -> None:
    """gguf-py takes any offset; llama.cpp and hubquant want tensors in order, without gaps or overlaps."""
    data = bases["llama"]
    layout = _layout(data)
    path = tmp_path / "overlap.gguf"
    path.write_bytes(_patched(data, layout.u64["tensor offset"][1], "<Q", 0))  # two tensors at 0
    GGUFReader(path)  # accepted there
    assert "without gaps or overlaps" in _refusal(path)
