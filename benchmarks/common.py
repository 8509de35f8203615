"""What the benchmark scripts share: the model cases, device helpers, versions, FLOP counts, the matmul ceiling."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub: every model here is built from scratch

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from amalgam import AmalgamationModule  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GRAY = {"mean": [0.286] * 3, "std": [0.353] * 3}


def _classes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


@dataclass
class Case:
    """One benchmark setting: the AmalgamationModule's arguments, the image side and the default batches."""

    name: str
    title: str
    image_size: int
    batches: tuple[int, ...]
    model: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> AmalgamationModule:
        torch.manual_seed(0)  # same random weights for every run of a case
        return AmalgamationModule(**{**self.model, **overrides})


def _teacher(task: str, n: int, arch: str, taps: list, size: int, norm: dict, **kwargs: Any) -> dict:
    return {"task": task, "classes": _classes(task, n), "arch": arch, "taps": taps, "input_size": size,
            **norm, **({"model_kwargs": kwargs} if kwargs else {})}


CASES = {
    # (a) the paper's two-ResNet-18 setting (CUB 200 + Dogs 120 classes), block on the pooled vectors.
    "a": Case("a", "2x resnet18 -> resnet18, pooled-vector block, 224 px", 224, (128, 256), {
        "teachers": [_teacher("cub", 200, "resnet18", ["pooled"], 224, IMAGENET),
                     _teacher("dogs", 120, "resnet18", ["pooled"], 224, IMAGENET)],
        "student": {"arch": "resnet18", "taps": ["pooled"], "input_size": 224, **IMAGENET}}),
    # (b) heterogeneous teachers, block on the last-stage maps (2048, 768 and 512 channels, all 7x7).
    "b": Case("b", "resnet50 + convnext_tiny -> resnet18, last-stage map block, 224 px", 224, (128,), {
        "teachers": [_teacher("cub", 200, "resnet50", ["layer4"], 224, IMAGENET),
                     _teacher("dogs", 120, "convnext_tiny", ["stages.3"], 224, IMAGENET)],
        "student": {"arch": "resnet18", "taps": ["layer4"], "input_size": 224, **IMAGENET}}),
    # (c) the Fashion-MNIST demo (configs/fashion/amalgamate.yaml), sized for 2 CPU cores.
    "c": Case("c", "resnet10t + small ViT -> slim resnet18, pooled block, 28 px", 28, (128,), {
        "teachers": [_teacher("a", 5, "resnet10t", ["pooled"], 28, GRAY, channels=[32, 64, 128, 256]),
                     _teacher("b", 5, "vit_tiny_patch16_224", ["pooled"], 28, {"mean": [0.5] * 3, "std": [0.5] * 3},
                              img_size=28, patch_size=7, embed_dim=96, depth=4, num_heads=3)],
        "student": {"arch": "resnet18", "taps": ["pooled"], "input_size": 28, "model_kwargs":
                    {"channels": [32, 64, 128, 256]}, **GRAY},
        "kd": "slice", "temperature": 4.0, "lr": 0.002,
        "loss_weights": {"kd": 1.0, "mmd": 10.0, "recon": 10.0, "balance": 1.0, "entropy": 0.1}}),
    # The tests' tiny models (tests/conftest.py TINY): a CNN and a ViT teacher, last-stage map block, 32 px.
    "tiny": Case("tiny", "tiny resnet10t + tiny ViT -> tiny resnet18, map block, 32 px", 32, (8,), {
        "teachers": [_teacher("a", 2, "resnet10t", ["layer4"], 32, GRAY, channels=[8, 8, 16, 16], stem_width=8),
                     _teacher("b", 3, "vit_tiny_patch16_224", ["blocks.1"], 32, {"mean": [0.5] * 3, "std": [0.5] * 3},
                              img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)],
        "student": {"arch": "resnet18", "taps": ["layer4"], "input_size": 32,
                    "model_kwargs": {"channels": [8, 8, 16, 16]}, **GRAY},
        "block_width": 8, "block_depth": 1}),
}


# ------------------------------------------------------------------------------------------------------------
# Devices

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak of the CUDA caching allocator since the last reset; None on CPU (see peak_rss_gib)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would include the parent's, inherited
    across the fork and exec that started this process)."""
    return _status_gib("VmHWM")


def rss_gib() -> float:
    """This process's resident memory now."""
    return _status_gib("VmRSS")


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_label(device: torch.device) -> str:
    """``cpu``, ``h100``, ``h200`` (or the GPU's name, lower-cased): the suffix of the results file."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    for known in ("H200", "H100", "A100", "L40S", "L4"):
        if known in name:
            return known.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", out)
        cores = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
        return f"{model.group(1).strip() if model else platform.processor()}, {cores.group(1) if cores else '?'} cores"
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "cpu"


def versions() -> dict[str, str | None]:
    import lightning
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------------------
# FLOPs and the hardware ceiling

def count_flops(fn) -> int:
    """FLOPs (matmuls, convolutions, attention) that ``fn()`` runs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bf16_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float | None:
    """Measured bf16 dense-matmul TFLOP/s on this GPU: the MFU denominator (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return 2 * n**3 / best / 1e12


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
