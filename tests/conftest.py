"""Shared fixtures: tiny random timm models and generated image folders, so the real CLI runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models run fastest on one thread, and two threads thrash when anything else shares the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import pytest
import torch
import yaml
from torch import nn

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


SIZE = 32
TINY = {
    "resnet": {"arch": "resnet10t", "model_kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
    "vit": {"arch": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": SIZE, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}},
    "convnext": {"arch": "convnext_atto", "model_kwargs": {"dims": [8, 8, 16, 16], "depths": [1, 1, 1, 1]}},
    "swin": {"arch": "swin_tiny_patch4_window7_224",
             "model_kwargs": {"img_size": SIZE, "window_size": 4, "embed_dim": 8, "depths": [1, 1],
                              "num_heads": [1, 1]}},
    "student": {"arch": "resnet18", "model_kwargs": {"channels": [8, 8, 16, 16]}},
}
# The last-stage map of each tiny family, and the ViT's last block.
LAST_STAGE = {"resnet": "layer4", "vit": "blocks.1", "convnext": "stages.3", "swin": "layers.1", "student": "layer4"}
TASK_CLASSES = {"a": ["cat", "dog"], "b": ["car", "bus", "van"], "c": ["oak", "elm"]}


def write_png(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> dict:
    """An unlabeled train folder (nested, mixed sizes) and a labelled eval folder per task."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        write_png(root / "train" / f"d{i % 3}" / f"sub{i % 2}" / f"{i}.png", rng, (40 + i, 36 + 2 * i))
    eval_dirs = {}
    for task, classes in TASK_CLASSES.items():
        for name in classes:
            for i in range(3):
                write_png(root / "eval" / task / name / f"{i}.png", rng, (SIZE, SIZE))
        eval_dirs[task] = str(root / "eval" / task)
    return {"train": str(root / "train"), "eval": eval_dirs}


def teacher(task: str, family: str, tap: str | None = "map", **extra) -> dict:
    taps = [] if tap is None else [LAST_STAGE[family] if tap == "map" else "pooled"]
    return {"task": task, "classes": TASK_CLASSES[task], "input_size": SIZE, "taps": taps, **TINY[family], **extra}


def student(tap: str | None = "map", **extra) -> dict:
    taps = [] if tap is None else [LAST_STAGE["student"] if tap == "map" else "pooled"]
    return {"input_size": SIZE, "taps": taps, **TINY["student"], **extra}


def amalgam_config(tmp_path: Path, image_tree: dict, teachers: list[dict], student_cfg: dict,
                   model_args: dict | None = None, trainer: dict | None = None, model_class: str =
                   "amalgam.AmalgamationModule") -> Path:
    tasks = [t["task"] for t in teachers]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path / "run"),
                    "enable_progress_bar": False, "logger": False, **(trainer or {})},
        "model": {"class_path": model_class,
                  "init_args": {"teachers": teachers, "student": student_cfg, "block_width": 8, "block_depth": 1,
                                **(model_args or {})}},
        "data": {"class_path": "amalgam.data.ImageFolderDataModule",
                 "init_args": {"train_dir": image_tree["train"],
                               "eval_dirs": {t: image_tree["eval"][t] for t in tasks if t in image_tree["eval"]},
                               "image_size": SIZE, "batch_size": 8, "num_workers": 0}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class TinyNet(nn.Module):
    """A plain nn.Module (not timm) used as a teacher by class path: tapped through forward hooks."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))
