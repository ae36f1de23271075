"""A safetensors file written one tensor at a time: the header is computed up front from
the tensors' names, dtypes and shapes, so a writer never holds more than the tensor it is
writing (offline tools, and the growth transition of a run)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def write_safetensors_stream(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file whose tensors arrive one by one, in `layout` order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in layout:
        n = torch.tensor([], dtype=dtype).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    expected = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            want, dtype, shape = next(expected)
            if name != want or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal: got {name} {tuple(t.shape)}, expected {want} {shape}")
            t = t.detach().to(dtype).contiguous()
            if t.numel():  # the tensor's own bytes, not a copy of them
                f.write(t.view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
