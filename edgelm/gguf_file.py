"""Read a GGUF file: metadata as Python values, tensors as zero-copy views of their quantized blocks.

The format (GGUF v2/v3, little-endian) is documented in ggml-org/ggml docs/gguf.md and implemented by
gguf-py's gguf_reader.py; this is our own parser because gguf.GGUFReader builds one NumPy object per
array element and takes ~17 s on a 262k-token vocabulary, where this takes a fraction of a second.
"""
from __future__ import annotations

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
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1


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
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], f"value of {key}")
            return v
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            itype = self.scalar("<I", f"array type of {key}")
            count = self.scalar("<Q", f"array length of {key}")
            if itype in _SCALARS:
                dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
                raw = self.take(count * dtype.itemsize, f"array {key}")
                return np.frombuffer(raw, dtype=dtype).copy()
            if itype == _STRING:
                return self._string_array(count, key)
            if itype == _ARRAY:
                return [self.value(_ARRAY, key) for _ in range(count)]
            raise GGUFError(f"{self.path}: key {key} has unknown array item type {itype}")
        raise GGUFError(f"{self.path}: key {key} has unknown value type {vtype}")

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
        if n_tensors > self.file_size or n_kv > self.file_size:   # each entry takes at least a byte
            raise GGUFError(f"{self.path}: header is corrupted (tensor count {n_tensors}, key count {n_kv})")
        meta: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}   # key -> (GGUF value type, array item type)
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            vtype = cur.scalar("<I", f"type of {key}")
            item = None
            if vtype == _ARRAY and cur.pos + 4 <= len(buf):
                item = struct.unpack_from("<I", buf, cur.pos)[0]
            meta[key] = cur.value(vtype, key)
            self.value_types[key] = (vtype, item)
        self.metadata = meta
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", f"dimensions of tensor {name}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions (1-4 allowed)")
            shape = tuple(cur.scalar("<Q", f"shape of tensor {name}") for _ in range(n_dims))
            ggml_type = cur.scalar("<I", f"type of tensor {name}")
            rel = cur.scalar("<Q", f"offset of tensor {name}")
            infos.append((name, ggml_type, shape, rel))
        align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align} is not a power of two")
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, shape, rel in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name} appears twice")
            try:
                fmt = format_for(ggml_type)
            except UnsupportedError as e:
                raise UnsupportedError(f"{self.path}: tensor {name}: {e}") from None
            if shape[0] % fmt.block_size:
                raise GGUFError(f"{self.path}: tensor {name} row length {shape[0]} is not a multiple of "
                                f"the {fmt.name} block size {fmt.block_size}")
            n_elems = int(np.prod(shape, dtype=np.int64))
            n_bytes = n_elems // fmt.block_size * fmt.type_size
            start = data_start + rel
            if rel % align or start + n_bytes > self.file_size:
                where = "is misaligned" if rel % align else (
                    f"lies outside the file (needs bytes {start}..{start + n_bytes}, file has {self.file_size})")
                raise GGUFError(f"{self.path}: tensor {name} data {where}")
            self.tensors[name] = TensorInfo(name, ggml_type, shape, start, n_bytes)

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
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors.values())

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: general.architecture is not a string")
        return arch


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return GGUFFile(path).metadata
