"""Read a GGUF file: metadata as Python values, tensors as zero-copy views of their quantized blocks.

The format (GGUF v2/v3, little-endian) is documented in ggml-org/ggml docs/gguf.md and implemented by
gguf-py's gguf_reader.py; this is our own parser because gguf.GGUFReader builds one NumPy object per
array element and takes ~17 s on a 262k-token vocabulary, where this takes a fraction of a second.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GGUFError, UnsupportedError
from .quant.formats import format_for

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # gguf.md: general.alignment, default 32

# value type id -> (struct format, numpy dtype); 8 = string and 9 = array are handled separately
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_INT_VALUE_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
# Arrays of arrays exist in the format, but no key that llama.cpp or gguf-py writes nests deeper than two
# levels; a limit keeps a hostile file from exhausting the recursion (and the time to read it).
MAX_ARRAY_DEPTH = 3
# Smallest possible entries (gguf.md): a key is an 8-byte length, at least 1 byte of name, a 4-byte type and a
# 1-byte value; a tensor info is a length, a name byte, n_dims, one dim, a type and an offset.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 14, 33


# Keys whose value type gguf.md (ggml docs) and gguf-py constants.py fix; every reader (tokenizer, chat
# template, info, bench) may rely on these types once the file is open. llama.cpp's typed getters refuse a
# mismatch too (llama-model-loader.cpp get_key: "key has wrong type").
_KNOWN_KEY_TYPES = {
    "general.architecture": "string", "general.name": "string", "general.basename": "string",
    "general.quantization_version": "integer", "general.file_type": "integer",
    "tokenizer.ggml.model": "string", "tokenizer.ggml.pre": "string", "tokenizer.chat_template": "string",
    **{f"tokenizer.ggml.{n}_token_id": "integer" for n in (
        "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "cls", "prefix", "suffix",
        "middle", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")},
    **{f"tokenizer.ggml.{n}": "boolean" for n in (
        "add_bos_token", "add_eos_token", "add_space_prefix", "add_sep_token", "remove_extra_whitespaces")},
}
_PYTHON_TYPES = {"string": (str,), "integer": (int,), "boolean": (bool,)}


def shown(name: str) -> str:
    """A key or tensor name as it may appear in a one-line message: escaped when it holds control characters."""
    return name if name.isprintable() else ascii(name)


class Metadata(dict):
    """The key/value dict of one file, carrying the file's path so that readers of it (the tokenizer) can name
    the file in their errors."""

    def __init__(self, *args, path: str = "", **kw):
        super().__init__(*args, **kw)
        self.path = path


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    offset: int             # absolute byte offset in the file
    n_bytes: int

    @property
    def n_in(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[1:])


class _Cursor:
    """Sequential little-endian reads over the mapped header, with truncation reported by name."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise GGUFError(f"{self.path}: file is truncated while reading {what}")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        raw = self.take(n, what)          # bounded by the bytes left before anything is copied
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def left(self) -> int:
        return len(self.buf) - self.pos

    def count(self, min_item_bytes: int, what: str) -> int:
        """An element count, refused when even the smallest items could not fit in the bytes left: checked
        before anything is allocated or looped over."""
        n = self.scalar("<Q", f"length of {what}")
        if n * min_item_bytes > self.left():
            raise GGUFError(f"{self.path}: {what} claims {n} items, more than the {self.left()} bytes left in "
                            f"the file can hold")
        return n

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], f"value of {key}")
            return v
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: key {shown(key)} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
            itype = self.scalar("<I", f"array type of {key}")
            if itype in _SCALARS:
                dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
                count = self.count(dtype.itemsize, f"array {key}")
                raw = self.take(count * dtype.itemsize, f"array {key}")
                return np.frombuffer(raw, dtype=dtype).copy()
            if itype == _STRING:
                return self._string_array(self.count(8, f"array {key}"), key)   # each string: 8-byte length
            if itype == _ARRAY:
                count = self.count(12, f"array {key}")                         # item type + length
                return [self.value(_ARRAY, key, depth + 1) for _ in range(count)]
            raise GGUFError(f"{self.path}: key {shown(key)} has unknown array item type {itype}")
        raise GGUFError(f"{self.path}: key {shown(key)} has unknown value type {vtype}")

    def _string_array(self, count: int, key: str) -> list[str]:
        # Hot path for vocabularies (262k entries): slice bytes directly instead of per-item cursor calls.
        buf, pos, out = self.buf, self.pos, []
        end = len(buf)
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > end:
                    raise struct.error
                out.append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except struct.error:
            raise GGUFError(f"{self.path}: file is truncated while reading array {key}") from None
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: array {key} holds a string that is not valid UTF-8") from None
        self.pos = pos
        return out


class GGUFFile:
    """An opened GGUF: `metadata` (dict), `tensors` (name -> TensorInfo), `tensor(name)` (uint8 view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise GGUFError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        size = os.path.getsize(self.path)
        if size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)
        self._parse(memoryview(self._mmap))

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self.path)
        if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic bytes)")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > cur.left():
            raise GGUFError(f"{self.path}: header is corrupted (tensor count {n_tensors}, key count {n_kv}: more "
                            f"entries than the file's {self.file_size} bytes can hold)")
        self.metadata = self._read_metadata(cur, n_kv)
        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        align = self._alignment()
        data_start = (cur.pos + align - 1) // align * align
        self.data_start = data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, shape, rel in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {shown(name)} appears twice")
            self.tensors[name] = self._place_tensor(name, ggml_type, shape, rel, data_start, align)

    def _read_metadata(self, cur: _Cursor, n_kv: int) -> "Metadata":
        meta = Metadata(path=self.path)
        self.value_types: dict[str, tuple[int, int | None]] = {}   # key -> (GGUF value type, array item type)
        buf = cur.buf
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            if key in meta:
                # llama.cpp's gguf_init_from_file refuses duplicate keys too (ggml/src/gguf.cpp)
                raise GGUFError(f"{self.path}: key {shown(key)} appears twice")
            label = shown(key)
            vtype = cur.scalar("<I", f"type of {label}")
            item = None
            if vtype == _ARRAY and cur.pos + 4 <= len(buf):
                item = struct.unpack_from("<I", buf, cur.pos)[0]
            meta[key] = cur.value(vtype, label)
            self.value_types[key] = (vtype, item)
            self._check_known_type(key, meta[key])
        return meta

    def _check_known_type(self, key: str, value: Any) -> None:
        kind = _KNOWN_KEY_TYPES.get(key)
        if kind is None:
            return
        ok = isinstance(value, _PYTHON_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))
        if not ok:
            found = f"an array of {len(value)} items" if isinstance(value, (list, np.ndarray)) else \
                f"{type(value).__name__} {value!r:.40}"
            raise GGUFError(f"{self.path}: key {key} must be a {kind}, found {found}")

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
        name = cur.string(f"tensor name #{i}")
        label = shown(name)
        n_dims = cur.scalar("<I", f"dimensions of tensor {label}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{self.path}: tensor {label} has {n_dims} dimensions (1-4 allowed)")
        shape = tuple(cur.scalar("<Q", f"shape of tensor {label}") for _ in range(n_dims))
        if min(shape) < 1:
            raise GGUFError(f"{self.path}: tensor {label} has shape {list(shape)}: every dimension must be >= 1")
        ggml_type = cur.scalar("<I", f"type of tensor {label}")
        rel = cur.scalar("<Q", f"offset of tensor {label}")
        return name, ggml_type, shape, rel

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        align = self.metadata["general.alignment"]
        if self.value_types["general.alignment"][0] not in _INT_VALUE_TYPES:
            raise GGUFError(f"{self.path}: key general.alignment must be an integer, found {align!r}")
        if align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: key general.alignment = {align} must be a power of two")
        return int(align)

    def _place_tensor(self, name: str, ggml_type: int, shape: tuple[int, ...], rel: int, data_start: int,
                      align: int) -> TensorInfo:
        """The tensor's type known, its size computed in Python integers (no overflow) and its bytes inside
        the file, aligned."""
        try:
            fmt = format_for(ggml_type)
        except UnsupportedError as e:
            raise UnsupportedError(f"{self.path}: tensor {shown(name)}: {e}") from None
        if shape[0] % fmt.block_size:
            raise GGUFError(f"{self.path}: tensor {shown(name)} row length {shape[0]} is not a multiple of "
                            f"the {fmt.name} block size {fmt.block_size}")
        n_bytes = math.prod(shape) // fmt.block_size * fmt.type_size
        start = data_start + rel
        if rel % align:
            raise GGUFError(f"{self.path}: tensor {shown(name)} data is misaligned (offset {rel}, alignment {align})")
        if start + n_bytes > self.file_size:
            raise GGUFError(f"{self.path}: tensor {shown(name)} data lies outside the file (needs bytes "
                            f"{start}..{start + n_bytes}, file has {self.file_size})")
        return TensorInfo(name, ggml_type, shape, start, n_bytes)

    # -- access ------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array (rows, row_bytes): a view of the mapped file."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        raw = self._data[info.offset:info.offset + info.n_bytes]
        return raw.reshape(info.n_rows, info.n_bytes // info.n_rows)

    @property
    def n_params(self) -> int:
        """Elements in all tensors (the model's parameter count)."""
        return sum(math.prod(t.shape) for t in self.tensors.values())

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: general.architecture is not a string")
        return arch


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return GGUFFile(path).metadata
