"""Recognise a safetensors file without torch: an 8-byte little-endian header length, a JSON header describing
each tensor (dtype, shape, data_offsets), then exactly the bytes the header accounts for.

Checkpoints are only ever accepted in this format: a pickle (``torch.save``) executes code when loaded.
"""

from __future__ import annotations

import io
import json
import math
import struct
from typing import IO, Any

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class NotSafetensors(ValueError):
    pass


def parse_safetensors_header(data: bytes) -> dict[str, Any]:
    """The tensor table of ``data`` (name -> {dtype, shape, data_offsets}); raises :class:`NotSafetensors`."""
    return read_safetensors_header(io.BytesIO(data), len(data))


def read_safetensors_header(handle: IO[bytes], size: int) -> dict[str, Any]:
    """The tensor table of a safetensors file of ``size`` bytes, reading only its header."""
    if size < 8:
        raise NotSafetensors("file is shorter than the 8-byte safetensors header length")
    handle.seek(0)
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > min(_MAX_HEADER_BYTES, size - 8):
        raise NotSafetensors("not a safetensors file (its header length is out of range; a pickle, perhaps)")
    try:
        header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotSafetensors("not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise NotSafetensors("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise NotSafetensors("safetensors file holds no tensors")
    payload = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        _check_entry(name, entry, payload)
        end = max(end, entry["data_offsets"][1])
    if end != payload:
        raise NotSafetensors(f"safetensors tensors cover {end} bytes but the file holds {payload}")
    return header


def _check_entry(name: str, entry: Any, payload: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
        raise NotSafetensors(f"tensor {name!r}: missing or unknown dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise NotSafetensors(f"tensor {name!r}: malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise NotSafetensors(f"tensor {name!r}: malformed data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= payload or end - begin != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
        raise NotSafetensors(f"tensor {name!r}: data_offsets do not match its dtype and shape")
