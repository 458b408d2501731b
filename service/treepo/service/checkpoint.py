"""Checks of a safetensors checkpoint before any engine loads it: a well-formed header that matches the
file's size, only finite floats (NaN/Inf weights make every later tree garbage), and its content hash.

Pure numpy over a memory map, one bounded chunk at a time: no torch, no full copy in memory; synchronous
(run it in a thread).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
CHUNK_BYTES = 16 * 2**20

# dtype -> (bytes per element, unsigned view, exponent mask): a value is NaN/Inf iff all exponent bits are set
# (float8 e4m3 has no Inf; its NaN is all ones below the sign bit, which the same test finds).
_FLOATS: dict[str, tuple[int, type[np.unsignedinteger], int]] = {
    "F64": (8, np.uint64, 0x7FF0_0000_0000_0000),
    "F32": (4, np.uint32, 0x7F80_0000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
    "F8_E5M2": (1, np.uint8, 0x7C),
    "F8_E4M3": (1, np.uint8, 0x7F),
}
_OTHERS = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


class CheckpointError(ValueError):
    """The checkpoint must not be loaded; the message says why (with file names relative to the weights dir)."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or every `*.safetensors` of a model dir."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                "the directory holds no *.safetensors file; save the checkpoint with safetensors"
            )
        return files
    return [path]


def check_checkpoint(path: Path, name: str) -> str:
    """Validate every file of the checkpoint at `path` (`name` is how messages call it); its sha256."""
    digest = hashlib.sha256()
    for file in checkpoint_files(path):
        label = name if file == path else f"{name}/{file.name}"
        check_file(file, label)
        digest.update(file.name.encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, name: str) -> None:
    """Header well-formed and consistent with the file size; every float tensor finite."""
    tensors, data_start = _read_header(path, name)
    if not tensors:
        return
    memory = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for tensor, (dtype, begin, end) in tensors.items():
            if dtype in _FLOATS:
                _check_finite(
                    memory[data_start + begin : data_start + end], dtype, f"{name}: tensor {tensor!r}"
                )
    finally:
        del memory


def _read_header(path: Path, name: str) -> tuple[dict[str, tuple[str, int, int]], int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{name} is not a safetensors file ({size} bytes; no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{name} is not a safetensors file (header of {header_len} bytes in a {size}-byte file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is not a safetensors file (its header is not a JSON object)")
    data_len = size - 8 - header_len
    tensors = {
        tensor: _entry(entry, f"{name}: tensor {tensor!r}", data_len)
        for tensor, entry in header.items()
        if tensor != "__metadata__"
    }
    covered = max((end for _, _, end in tensors.values()), default=0)
    if covered != data_len:
        raise CheckpointError(
            f"{name}: the header describes {covered} bytes of tensor data but the file holds {data_len} "
            "(truncated or padded upload?)"
        )
    return tensors, 8 + header_len


def _entry(entry: object, where: str, data_len: int) -> tuple[str, int, int]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    width = _FLOATS[dtype][0] if dtype in _FLOATS else _OTHERS.get(dtype) if isinstance(dtype, str) else None
    if width is None:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers (got {shape!r})")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise CheckpointError(
            f"{where}: data_offsets {offsets!r} lie outside the file's {data_len} data bytes"
        )
    begin, end = offsets
    if end - begin != math.prod(shape) * width:
        raise CheckpointError(f"{where}: {end - begin} bytes for shape {shape} of {dtype}")
    return dtype, begin, end


def _check_finite(raw: np.ndarray, dtype: str, where: str) -> None:
    width, view, mask = _FLOATS[dtype]
    step = CHUNK_BYTES - CHUNK_BYTES % width
    for start in range(0, len(raw), step):
        bits = np.frombuffer(raw[start : start + step], dtype=np.dtype(view).newbyteorder("<"))
        if np.any((bits & view(mask)) == view(mask)):
            raise CheckpointError(
                f"{where} holds NaN or Inf values; refusing weights that would poison sampling"
            )
