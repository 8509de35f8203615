"""Reader for the IDX format of (Fashion-)MNIST, gzip-compressed.

Layout: 2 zero bytes, 1 byte element type, 1 byte number of dimensions, then one
big-endian uint32 per dimension, then the elements in row-major order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> Tensor:
    """The array in a `.gz` IDX file as a tensor (uint8 files stay uint8)."""
    path = Path(path)
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); re-download it")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"found {len(data) - header_size} bytes; re-download it"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # Native byte order and a writable copy: torch refuses big-endian and read-only buffers.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
