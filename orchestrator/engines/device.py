"""Which device and process-group backend a run uses: `engine.device` auto|cpu|cuda;
CUDA means NCCL and one GPU per rank (LOCAL_RANK), the CPU means gloo."""
from __future__ import annotations

import os

import torch


def device_type(name: str) -> str:
    """The device type `engine.device` means here (auto: cuda when one is visible), without
    checking that it is there (`pick_device` does)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_device(name: str) -> torch.device:
    name = device_type(name)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
