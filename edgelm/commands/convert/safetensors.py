"""Read a Hugging Face checkpoint's *.safetensors files (single or sharded) by memory-mapping them.

The format (huggingface/safetensors, docs "format"): an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian
tensor bytes, offsets counted from the end of the header. Pickled checkpoints (*.bin, *.pt) are refused:
unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import EdgeLMError

# safetensors dtype names -> numpy (BF16 is read as its uint16 bits and widened to float32)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int      # absolute byte offsets in the file
    end: int


class Checkpoint:
    """All tensors of a checkpoint directory by name: `shape(name)`, `dtype(name)`, `load(name)`."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        files = self._files()
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            for name, e in _read_header(f).items():
                if name in self.entries:
                    raise EdgeLMError(f"{f}: tensor {name} is also in {self.entries[name].file.name}")
                self.entries[name] = e

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise EdgeLMError(f"{index}: not a safetensors index ({e})") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise EdgeLMError(f"{index}: shard {missing[0]} is missing")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickles = [p.name for pat in _PICKLES for p in self.dir.glob(pat)]
        if pickles:
            raise EdgeLMError(f"{self.dir}: only pickled weights ({pickles[0]}); edgelm does not unpickle "
                              f"checkpoints (that can run code): save them as safetensors first")
        raise EdgeLMError(f"{self.dir}: no *.safetensors weights found")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16 bits), a view of the mapped file."""
        e = self.entries[name]
        m = self._maps.get(e.file)
        if m is None:
            m = self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        return m[e.begin:e.end].view(_DTYPES[e.dtype]).reshape(e.shape)

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (exact for F16 and BF16)."""
        e = self.entries[name]
        a = self.raw(name)
        if e.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if e.dtype in ("F32", "F16", "F64"):
            return a.astype(np.float32)
        raise EdgeLMError(f"{e.file}: tensor {name} has dtype {e.dtype}, expected a float type")


def _read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise EdgeLMError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    base = 8 + n
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EdgeLMError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise EdgeLMError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if e - b != want or base + e > size or b < 0:
            raise EdgeLMError(f"{path}: tensor {name} data [{b}, {e}) does not match its shape {list(shape)} "
                              f"or lies outside the file")
        out[name] = TensorEntry(path, dtype, shape, base + b, base + e)
    return out
