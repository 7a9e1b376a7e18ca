"""Fuzz: hubquant's safetensors reader against the safetensors library on the same mutated bytes.

Small valid files (several tensors of several dtypes: F8, BF16, BOOL, F4, a scalar, a zero-size
tensor, metadata) go through 1 to 3 mutations each: header JSON edits (dropped, duplicated and
renamed keys, wrong types, negative, huge and float numbers, overlapping, gapped and shuffled
offsets, wrong byte counts, consistent reshapes the library accepts), header length edits,
padding, truncation, appended bytes and byte flips in the header and the data. On each file
either both refuse (hubquant with a one-line HubquantError naming the file), or both accept and
every tensor is the same (names, dtypes, shapes, bytes) through hubquant's `read()` and `map()`.
The library's reading is `safe_open` + `get_tensor`; `safetensors.torch.load` on the same bytes,
where it reads them at all (it has no F4 / F8_E8M0 mapping, and refuses some empty shapes), must
read the same.

Each case is built from its own seed (`case(i)`), so a failure can be replayed alone.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from hubquant.errors import HubquantError
from hubquant.models.safetensors_file import BITS, SafetensorsFile

SEED = 1111
FILES = 10_000


class Obj(list):
    """A JSON object as (key, value) pairs: keys can repeat, and order is kept."""


class Raw(str):
    """JSON text written as is (e.g. `-0`, `1e2`, `NaN`)."""


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def obj(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj((k, obj(v)) for k, v in value.items())
    if isinstance(value, list):
        return [obj(v) for v in value]
    return value


def frame(header: str | bytes, data: bytes) -> bytes:
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def split(blob: bytes) -> tuple[Obj, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return obj(json.loads(blob[8 : 8 + length])), blob[8 + length :]


def _bases() -> list[bytes]:
    gen = torch.Generator().manual_seed(SEED)
    saved = save(
        {
            "f32": torch.randn(3, 5, generator=gen),
            "bf16": torch.randn(7, generator=gen).bfloat16(),
            "f16": torch.randn(2, 2, 2, generator=gen).half(),
            "i64": torch.arange(6).reshape(2, 3),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(0.25),
            "empty": torch.zeros(0, 4),
            "f8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
            "f8b": torch.randn(3, generator=gen).to(torch.float8_e5m2),
        },
        metadata={"format": "pt", "note": "h\u00e9llo"},
    )
    rng = random.Random(SEED)

    def handmade(specs: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None) -> bytes:
        header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
        offset, data = 0, b""
        for name, code, shape in specs:
            size = BITS[code] * _numel(shape) // 8
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            data += bytes(rng.randrange(256) for _ in range(size))
            offset += size
        items = list(header.items())
        rng.shuffle(items)  # the library sorts by offsets: any order is valid
        return frame(json.dumps(dict(items)), data)

    return [
        saved,
        handmade(
            [
                ("packed", "F4", [2, 4]),
                ("e8m0", "F8_E8M0", [3]),
                ("u16", "U16", [2]),
                ("c64", "C64", [1]),
                ("zero", "F32", [2, 0]),
                ("i8", "I8", [5]),
                ("fnuz", "F8_E4M3FNUZ", [2]),
            ],
            {"k": "v"},
        ),
        handmade([("six", "F6_E2M3", [4]), ("u8", "U8", [3]), ("b", "BOOL", [2])], None),
        handmade([("w", "F32", [2, 2]), ("nothing", "U64", [0])], {}),
        frame("{}", b""),
    ]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor_entries(header: Obj) -> list[tuple[str, Obj]]:
    return [(k, v) for k, v in header if k != "__metadata__" and isinstance(v, Obj)]


def _field(entry: Obj, key: str) -> Any:
    for k, v in entry:
        if k == key:
            return v
    return None


def _set(entry: Obj, key: str, value: Any) -> None:
    for i, (k, _) in enumerate(entry):
        if k == key:
            entry[i] = (key, value)
            return
    entry.append((key, value))


WEIRD_NUMBERS = [-1, -(2**63), 2**63, 2**64 - 1, 2**64, 2**80, 1.0, 0.5, 1e300, True, None, "2", [1], Raw("-0"), Raw("1e2"), Raw("NaN"), Raw("2.0")]  # fmt: skip
CODES = [*BITS, "f32", "F32 ", "XX", "", "F8_E4M3FN", "I4", 5, None, ["F32"], Raw("true")]
METADATA = [None, {}, {"k": 1}, [], "x", {"a": {"b": "c"}}, {"format": "pt"}, {"x": None}, Raw('{"a":"1","a":"2"}')]  # fmt: skip
NAMES = ["", "__metadata__", "caf\u00e9", "a\\b", "tab\there", "\ud800", "x" * 300, "f32", "nul\u0000"]


def _relayout(header: Obj, data: bytes, rng: random.Random) -> bytes:
    """Offsets recomputed from each entry's dtype and shape, in a random order: a valid layout."""
    entries = _tensor_entries(header)
    rng.shuffle(entries)
    offset, out = 0, b""
    for _, entry in entries:
        code, shape = _field(entry, "dtype"), _field(entry, "shape")
        if (
            not isinstance(code, str)
            or code not in BITS
            or not isinstance(shape, list)
            or any(type(d) is not int for d in shape)
        ):
            return data
        size = BITS[code] * _numel(shape) // 8
        if not 0 <= size <= 4096:
            return data
        _set(entry, "data_offsets", [offset, offset + size])
        out += bytes(rng.randrange(256) for _ in range(size))
        offset += size
    return out


def mutate_header(header: Obj, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One edit of the parsed header (and the data when the edit keeps the file consistent)."""
    entries = _tensor_entries(header)
    kind = rng.choice(
        ["drop", "duplicate", "copy", "rename", "shuffle", "field", "dtype", "shape", "offsets",
         "shift", "metadata", "reshape", "retype", "resize", "relayout"]
        + ["duplicate", "shuffle", "reshape", "retype", "resize", "relayout"]  # valid more often
    )  # fmt: skip
    if not entries and kind not in ("metadata", "shuffle"):
        kind = "copy"
    if kind == "drop" and header:
        header.pop(rng.randrange(len(header)))
    elif kind == "duplicate" and header:  # the same key twice: the last one wins
        k, v = rng.choice(header)
        header.insert(rng.randrange(len(header) + 1), (k, obj(json.loads(dump(v)))))
    elif kind == "copy":  # a second name on an entry's bytes (overlap), or a new entry
        source = rng.choice(entries)[1] if entries else obj({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})  # fmt: skip
        header.append((f"copy{rng.randrange(9)}", obj(json.loads(dump(source)))))
    elif kind == "rename" and header:
        i = rng.randrange(len(header))
        header[i] = (rng.choice(NAMES), header[i][1])
    elif kind == "shuffle":
        rng.shuffle(header)
    elif kind == "field":
        entry = rng.choice(entries)[1]
        action = rng.choice(["drop", "dup", "extra", "rename"])
        i = rng.randrange(len(entry)) if entry else 0
        if action == "drop" and entry:
            entry.pop(i)
        elif action == "dup" and entry:
            entry.append(entry[i])
        elif action == "extra":
            entry.insert(i, (rng.choice(["x", "offsets", "Shape"]), rng.choice([1, "s", None, [1, 2], {"a": 1}, 1.5])))  # fmt: skip
        elif entry:
            entry[i] = (entry[i][0].upper(), entry[i][1])
    elif kind == "dtype":
        _set(rng.choice(entries)[1], "dtype", rng.choice(CODES))
    elif kind == "shape":
        entry = rng.choice(entries)[1]
        shape = _field(entry, "shape")
        shape = list(shape) if isinstance(shape, list) else [1]
        action = rng.choice(["weird", "append", "pop", "nudge", "zero", "type"])
        if action == "weird" or not shape:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice(WEIRD_NUMBERS))
        elif action == "append":
            shape.append(rng.choice([1, 2, 0]))
        elif action == "pop":
            shape.pop(rng.randrange(len(shape)))
        elif action == "nudge":
            i = rng.randrange(len(shape))
            if isinstance(shape[i], int):
                shape[i] = max(0, shape[i] + rng.choice([-1, 1, 2]))
        elif action == "zero":
            shape[rng.randrange(len(shape))] = 0
        else:
            shape = rng.choice([{"0": 1}, 3, "3", None, [[2, 2]]])
        _set(entry, "shape", shape)
    elif kind == "offsets":
        entry = rng.choice(entries)[1]
        offsets = _field(entry, "data_offsets")
        offsets = list(offsets) if isinstance(offsets, list) and len(offsets) == 2 else [0, 0]
        action = rng.choice(["nudge", "weird", "swap", "length", "type"])
        i = rng.randrange(2)
        if action == "nudge" and isinstance(offsets[i], int):
            offsets[i] = offsets[i] + rng.choice([-8, -1, 1, 2, 8])
        elif action == "weird":
            offsets[i] = rng.choice(WEIRD_NUMBERS)
        elif action == "swap":
            offsets.reverse()
        elif action == "length":
            offsets = rng.choice([offsets[:1], [*offsets, offsets[-1]], []])
        else:
            offsets = rng.choice([{"0": 0, "1": 4}, "0,4", None, 4])
        _set(entry, "data_offsets", offsets)
    elif kind == "shift":  # a gap (or overlap) before every tensor after a point, data made to match
        k = rng.choice([-4, -1, 1, 2, 8])
        cut = rng.randrange(len(data) + 1)
        for _, entry in entries:
            offsets = _field(entry, "data_offsets")
            if isinstance(offsets, list) and all(isinstance(n, int) for n in offsets):
                _set(entry, "data_offsets", [n + k if n >= cut else n for n in offsets])
        data = data[:cut] + bytes(k) + data[cut:] if k > 0 else data[:cut] + data[cut - k :]
    elif kind == "metadata":
        value = rng.choice(METADATA)
        if rng.random() < 0.5:  # usually replace the existing one, else a second one
            header[:] = [(k, v) for k, v in header if k != "__metadata__"]
        header.insert(rng.randrange(len(header) + 1), ("__metadata__", obj(value)))
    elif kind == "reshape":  # same element count, new shape: accepted, read differently
        entry = rng.choice(entries)[1]
        shape = _field(entry, "shape")
        if isinstance(shape, list) and all(type(d) is int for d in shape):
            n = _numel(shape)
            _set(entry, "shape", rng.choice([[n], [1, n], [n, 1], list(reversed(shape)), [*shape, 1]]))
    elif kind == "retype":  # a dtype of the same width: accepted, read differently
        entry = rng.choice(entries)[1]
        code = _field(entry, "dtype")
        if isinstance(code, str) and code in BITS:
            _set(entry, "dtype", rng.choice([c for c, bits in BITS.items() if bits == BITS[code]]))
    elif kind == "resize":  # a new shape, then every offset recomputed
        entry = rng.choice(entries)[1]
        _set(entry, "shape", rng.choice([[2], [3], [0], [], [2, 3], [1, 0, 2], [4, 4]]))
        data = _relayout(header, data, rng)
    else:
        data = _relayout(header, data, rng)
    return kind, data


def case(i: int, bases: list[bytes]) -> tuple[bytes, list[str]]:
    """The `i`-th mutated file and the names of its mutations."""
    rng = random.Random(SEED * 1_000_003 + i)
    blob = rng.choice(bases[:2] * 3 + bases[2:])  # mostly the two many-dtype files
    header, data = split(blob)
    done: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind, data = mutate_header(header, data, rng)
        done.append(kind)
    text = dump(header)
    if rng.random() < 0.3:
        pad = rng.choice(
            [" ", "\t", "\n", "\r", "\x00", "  \n", "\ufeff", "x", ",", "}", " " * rng.randrange(8)]
        )
        where = rng.random()
        text = pad + text if where < 0.3 else text + pad
        done.append(f"pad{'<' if where < 0.3 else '>'}{pad!r}")
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:  # text-level byte edit in the header
        j = rng.randrange(len(raw)) if raw else 0
        raw = raw[:j] + bytes([rng.randrange(256)]) + raw[j + rng.choice([0, 1, 1]) :]
        done.append("header-byte")
    blob = frame(raw, data)
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        kind = rng.choice(["length", "truncate", "append", "flip-header", "flip-data", "flip-data"])
        done.append(kind)
        if kind == "length" and len(blob) >= 8:
            (n,) = struct.unpack("<Q", blob[:8])
            n = rng.choice([n + rng.choice([-8, -1, 1, 8]), 0, 2**63, 2**64 - 1, 100_000_001, len(blob), rng.randrange(2**64)])  # fmt: skip
            blob = struct.pack("<Q", n % 2**64) + blob[8:]
        elif kind == "truncate" and blob:
            blob = blob[: rng.randrange(len(blob))]
        elif kind == "append":
            blob += bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 16])))
        elif kind == "flip-header" and len(blob) > 8:
            (n,) = struct.unpack("<Q", blob[:8])
            j = rng.randrange(min(len(blob), 8 + n) if n < len(blob) else len(blob))
            blob = blob[:j] + bytes([blob[j] ^ (1 << rng.randrange(8))]) + blob[j + 1 :]
        elif kind == "flip-data" and blob:
            j = rng.randrange(min(len(blob) - 1, max(0, len(blob) - len(data))), len(blob))
            blob = blob[:j] + bytes([rng.randrange(256)]) + blob[j + 1 :]
    return blob, done


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def library_view(path: Path) -> tuple[dict[str, str], dict[str, tuple[Any, ...]]] | None:
    """What the safetensors library reads from `path`: (metadata, {name: (dtype, shape, bytes)}),
    or None when it refuses (on open, or on reading any tensor)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return metadata, {k: (t.dtype, tuple(t.shape), _bytes(t)) for k, t in tensors.items()}
    except BaseException as error:  # SafetensorError, TypeError from torch, pyo3's PanicException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def load_view(blob: bytes) -> dict[str, tuple[Any, ...]] | None:
    """What `safetensors.torch.load` reads from the bytes, or None when it fails."""
    try:
        return {k: (t.dtype, tuple(t.shape), _bytes(t)) for k, t in load(blob).items()}
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def hubquant_view(path: Path) -> tuple[dict[str, str], dict[str, tuple[Any, ...]]]:
    """What hubquant reads: (metadata, {name: (dtype, shape, bytes)}), read() and map() agreeing."""
    out = {}
    with SafetensorsFile(path) as f:
        for k in f.keys():
            got = f.read(k)
            mapped = f.map(k)
            assert got.dtype == mapped.dtype == f.dtype(k), (k, got.dtype, mapped.dtype, f.dtype(k))
            assert tuple(got.shape) == tuple(mapped.shape) == f.shape(k), (k, got.shape, mapped.shape)
            assert _bytes(got) == _bytes(mapped), k
            out[k] = (got.dtype, tuple(got.shape), _bytes(got))
            del mapped
        return dict(f.metadata), out


def compare(path: Path, blob: bytes) -> tuple[str | None, bool]:
    """(None when hubquant and the library agree on `blob` (written at `path`), else what differs;
    whether the library accepts the file)."""
    want = library_view(path)
    accepted = want is not None
    # `load` reads less than `safe_open` (no F4 / F8_E8M0 mapping; torch.empty for empty tensors,
    # which refuses some shapes frombuffer takes): what it does read must be the same.
    loaded = load_view(blob)
    if loaded is not None and (want is None or loaded != want[1]):
        return "safetensors.torch.load reads it differently from safe_open", accepted
    try:
        got = hubquant_view(path)
    except HubquantError as error:
        message = str(error)
        if "\n" in message or "\r" in message or str(path) not in message:
            return f"refusal is not one line naming the file: {message!r}", accepted
        return (f"library accepts, hubquant refuses: {message}" if accepted else None), accepted
    except Exception as error:  # noqa: BLE001 - any other exception type is a failure
        return f"{type(error).__name__} instead of HubquantError: {error}", accepted
    if want is None:
        return f"library refuses, hubquant accepts {sorted(got[1])}", accepted
    if got != want:
        mine = [(k, v[:2]) for k, v in got[1].items()]
        theirs = [(k, v[:2]) for k, v in want[1].items()]
        return f"different contents: hubquant {got[0]} {mine} vs library {want[0]} {theirs}", accepted
    return None, accepted


def test_mutated_files_match_the_library(tmp_path: Path) -> None:
    bases = _bases()
    accepted = refused = 0
    divergences: list[str] = []
    start = time.perf_counter()
    for i in range(FILES):
        blob, mutations = case(i, bases)
        # A new file each time (rewriting one file in place is ~30x slower on ext4).
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(blob)
        problem, library_accepts = compare(path, blob)
        path.unlink()
        if problem is not None:
            divergences.append(f"case {i} {mutations}: {problem}")
        elif library_accepts:
            accepted += 1
        else:
            refused += 1
    elapsed = time.perf_counter() - start
    summary = (
        f"{FILES} mutated safetensors files: {accepted} accepted, {refused} refused by both, "
        f"{len(divergences)} divergences from the safetensors library ({elapsed:.1f} s)"
    )
    print(summary)
    assert not divergences, summary + "\n" + "\n".join(divergences[:20])
    # A fuzz that only produces refusals (or only valid files) would prove little.
    assert accepted >= FILES // 10 and refused >= FILES // 10, summary


def test_the_fuzz_can_find_a_divergence(tmp_path: Path, monkeypatch) -> None:
    """The comparison is not vacuous: a reader that skips the library's checks diverges."""
    import hubquant.models.safetensors_file as module

    monkeypatch.setattr(module, "library_problem", lambda path: None)
    bases = _bases()
    path = tmp_path / "fuzz.safetensors"
    found = []
    for i in range(300):
        blob, mutations = case(i, bases)
        path.unlink(missing_ok=True)
        path.write_bytes(blob)
        problem, _ = compare(path, blob)
        if problem is not None:
            found.append((i, mutations, problem))
    print(f"300 files with the library's check switched off: {len(found)} divergences")
    assert found, "the fuzz found nothing even with the library's checks switched off"


def _file(header: str, data: bytes = b"") -> bytes:
    return frame(header, data)


def _one(code: str, shape: Any, offsets: Any = None, extra: str = "") -> str:
    if offsets is None:
        size = BITS[code] * _numel(shape) // 8 if all(type(d) is int for d in shape) else 0
        offsets = [0, size]
    return f'{{"t":{{"dtype":"{code}","shape":{json.dumps(shape)},"data_offsets":{json.dumps(offsets)}{extra}}}}}'


F32 = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}%s}'
# (label, file bytes, whether the library reads it: None where that is the library's business)
EDGES: list[tuple[str, bytes, bool | None]] = [
    ("plain", _file(F32 % "", b"abcd"), True),
    ("leading whitespace", _file(" " + F32 % "", b"abcd"), None),
    ("trailing whitespace", _file(F32 % "" + " \t\r\n", b"abcd"), True),
    ("trailing NUL", _file(F32 % "" + "\x00", b"abcd"), False),
    ("UTF-8 BOM", _file("\ufeff" + F32 % "", b"abcd"), False),
    ("not an object", _file("[]"), False),
    ("empty header, no data", _file("{}"), True),
    ("empty header, one data byte", _file("{}", b"x"), False),
    ("data one byte short", _file(F32 % "", b"abc"), False),
    ("data one byte long", _file(F32 % "", b"abcde"), False),
    ("length field only", struct.pack("<Q", 2), False),
    ("7 bytes", b"\x02\x00\x00\x00\x00\x00\x00", False),
    ("length 2^64-1", struct.pack("<Q", 2**64 - 1) + b"{}", False),
    ("length just over 100 MB", struct.pack("<Q", 100_000_001) + b"{}", False),
    (
        "duplicate name, last wins",
        _file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' + F32[1:] % "", b"abcd"),
        True,
    ),  # fmt: skip
    (
        "duplicate name, first fits",
        _file(F32 % ',"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', b"abcd"),
        False,
    ),  # fmt: skip
    ("duplicate field", _file(_one("F32", [1], extra=',"dtype":"F32"'), b"abcd"), False),
    ("duplicate __metadata__", _file(F32 % ',"__metadata__":{},"__metadata__":{}', b"abcd"), False),
    ("__metadata__ null", _file(F32 % ',"__metadata__":null', b"abcd"), True),
    ("__metadata__ int value", _file(F32 % ',"__metadata__":{"k":1}', b"abcd"), False),
    ("__metadata__ duplicate key", _file(F32 % ',"__metadata__":{"k":"1","k":"2"}', b"abcd"), True),
    ("unknown field", _file(_one("F32", [1], extra=',"x":[1,{"y":null}]'), b"abcd"), True),
    ("NaN in unknown field", _file(_one("F32", [1], extra=',"x":NaN'), b"abcd"), False),
    ("1e999 in unknown field", _file(_one("F32", [1], extra=',"x":1e999'), b"abcd"), False),
    ("5000-digit int in unknown field", _file(_one("F32", [1], extra=',"x":' + "9" * 5000), b"abcd"), False),
    (
        "deep nesting in unknown field",
        _file(_one("F32", [1], extra=',"x":' + "[" * 200 + "]" * 200), b"abcd"),
        False,
    ),  # fmt: skip
    (
        "lone surrogate in a name",
        _file('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"abcd"),
        False,
    ),  # fmt: skip
    (
        "NUL and newline in a name",
        _file('{"a\\u0000\\n":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"abcd"),
        True,
    ),  # fmt: skip
    (
        "escaped dtype",
        _file('{"a":{"dtype":"F\\u0033\\u0032","shape":[1],"data_offsets":[0,4]}}', b"abcd"),
        True,
    ),
    ("lower-case dtype", _file(_one("F32", [1]).replace("F32", "f32"), b"abcd"), False),
    ("shape -0", _file(_one("F32", [1]).replace("[1]", "[-0]"), b""), False),
    ("shape 1.0", _file(_one("F32", [1]).replace("[1]", "[1.0]"), b"abcd"), False),
    ("shape 1e0", _file(_one("F32", [1]).replace("[1]", "[1e0]"), b"abcd"), False),
    ("shape true", _file(_one("F32", [1]).replace("[1]", "[true]"), b"abcd"), False),
    ("shape 2^64", _file(_one("F32", [2**64], [0, 0])), False),
    ("offsets 3 long", _file(_one("F32", [1], [0, 4, 4]), b"abcd"), False),
    ("offsets reversed", _file(_one("F32", [0], [4, 0]), b"abcd"), False),
    ("scalar", _file(_one("F32", []), b"abcd"), True),
    (
        "zero-size at the end",
        _file('{"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},' + F32[1:] % "", b"abcd"),
        True,
    ),  # fmt: skip
    (
        "zero-size inside",
        _file('{"z":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},' + F32[1:] % "", b"abcd"),
        False,
    ),  # fmt: skip
    (
        "zero-size past the end",
        _file('{"z":{"dtype":"F32","shape":[0],"data_offsets":[5,5]},' + F32[1:] % "", b"abcd"),
        False,
    ),  # fmt: skip
    (
        "overlap",
        _file('{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + F32[1:] % "", b"abcd"),
        False,
    ),
    (
        "gap",
        _file('{"b":{"dtype":"F32","shape":[1],"data_offsets":[5,9]},' + F32[1:] % "", b"abcdefghi"),
        False,
    ),  # fmt: skip
    ("F4 pairs", _file(_one("F4", [3, 2]), b"abc"), True),
    ("F4 odd last dimension", _file(_one("F4", [2, 3]), b"abc"), False),
    ("F4 zero rows", _file(_one("F4", [0, 3])), False),
    ("F4 zero pairs", _file(_one("F4", [3, 0])), True),
    ("F4 scalar", _file(_one("F4", [], [0, 0])), False),
    ("F4 half a byte", _file(_one("F4", [1], [0, 0])), False),
    ("F6", _file(_one("F6_E2M3", [4]), b"abc"), False),
    ("F8_E8M0", _file(_one("F8_E8M0", [3]), b"abc"), True),
    ("F8_E5M2FNUZ", _file(_one("F8_E5M2FNUZ", [3]), b"abc"), True),
    ("U16", _file(_one("U16", [2]), b"abcd"), True),
    ("U64", _file(_one("U64", [1]), b"abcdefgh"), True),
    ("C64", _file(_one("C64", [1]), b"abcdefgh"), True),
    ("BOOL byte 2", _file(_one("BOOL", [3]), b"\x01\x02\x00"), True),
    ("empty 2^62 x 0", _file(_one("F32", [2**62, 0])), True),
    ("empty 2^63 x 0", _file(_one("F32", [2**63, 0])), False),
    ("empty 0 x 2^62 x 2^62", _file(_one("F32", [0, 2**62, 2**62])), True),
    ("empty 0 x (2^63-1) x 2", _file(_one("F32", [0, 2**63 - 1, 2])), False),
    ("empty 2^62 x 2^62 x 0 (overflow)", _file(_one("F32", [2**62, 2**62, 0])), False),
    ("size overflow", _file(_one("F32", [2**62], [0, 0])), False),
]


def test_edge_cases_match_the_library(tmp_path: Path) -> None:
    problems = []
    for i, (label, blob, readable) in enumerate(EDGES):
        path = tmp_path / f"edge{i}.safetensors"
        path.write_bytes(blob)
        problem, accepted = compare(path, blob)
        if problem is None and readable is not None and accepted != readable:
            problem = f"the library {'reads' if accepted else 'refuses'} it (the test expected otherwise)"
        if problem is not None:
            problems.append(f"{label}: {problem}")
    print(f"{len(EDGES)} edge cases, {len(problems)} divergences")
    assert not problems, "\n".join(problems)
