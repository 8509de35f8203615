"""The student's life after training: export it alone, reload it without Lightning, predict, ONNX.

``python -m amalgam export --ckpt run.ckpt --out DIR [--onnx]`` writes
- ``DIR/model.safetensors``: the student's weights under the plain timm model's own keys, so they also load
  into ``timm.create_model(arch, num_classes=N, **model_kwargs)``;
- ``DIR/config.json``: architecture, tasks (class names and their slice of the union head), preprocessing;
- ``DIR/model.onnx`` with ``--onnx``: float RGB in [0, 1] at ``input_size`` in, union logits out.
No teacher, no common-feature block, no optimizer state: only what prediction needs.
``load_student(DIR)`` rebuilds a ``Student`` (a plain ``nn.Module``) from those two files, reading no pickle.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from amalgam.backbones import TappedNetwork, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
FORMAT = "amalgam.student"
FORMAT_VERSION = 1
STUDENT_PREFIX = "student.model."  # AmalgamationModule.student (TappedNetwork) .model (the timm model)


class Student(nn.Module):
    """A trained student, standalone: preprocessing, the network, and the tasks of its union head.

    ``forward(images)`` takes float RGB images in [0, 1], or uint8 ones in [0, 255] as ``torchvision.io``
    reads them (any size: they are resized to ``input_size``), and returns the union logits; ``predict`` turns them into per-task and task-agnostic answers;
    ``predict_files`` reads image files with the training data's resize and center crop.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.model = build_model(config["arch"], config["num_classes"], config.get("model_kwargs"))
        pre = config["preprocessing"]
        self.input_size = int(pre["input_size"])
        self.image_size = int(pre.get("image_size") or self.input_size)
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, -1, 1, 1), persistent=False)
        self.tasks = {t["name"]: list(t["classes"]) for t in config["tasks"]}
        self.slices = {t["name"]: tuple(t["slice"]) for t in config["tasks"]}
        self.union = [(task, name) for task, classes in self.tasks.items() for name in classes]

    def preprocess(self, images: Tensor) -> Tensor:
        if not images.is_floating_point():  # uint8 pixels: read as-is they would be 255x too bright
            images = images.float() / 255
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = nn.functional.interpolate(images, size=(self.input_size, self.input_size),
                                               mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.preprocess(images))

    def task_logits(self, images: Tensor) -> dict[str, Tensor]:
        """Each task's logits (task-aware: the teacher's own classes only)."""
        logits = self(images)
        return {task: logits[:, a:b] for task, (a, b) in self.slices.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, Any]]:
        """Per image: ``{"union": {"task", "class"}, "tasks": {task: {"class", "prob"}}}``."""
        logits = self(images)
        out = []
        for row in logits:
            tasks = {}
            for task, (a, b) in self.slices.items():
                probs = row[a:b].softmax(0)
                top = int(probs.argmax())
                tasks[task] = {"class": self.tasks[task][top], "prob": float(probs[top])}
            union_task, union_class = self.union[int(row.argmax())]
            out.append({"union": {"task": union_task, "class": union_class}, "tasks": tasks})
        return out

    def load_images(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files as the training data saw them: shorter side to ``image_size``, center crop, [0, 1]."""
        from amalgam.data.image_files import load_image

        return torch.stack([load_image(Path(p), self.image_size) for p in paths]).float().div_(255)

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 64) -> list[dict[str, Any]]:
        device = self.mean.device
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            results += [{"image": str(p), **r}
                        for p, r in zip(chunk, self.predict(self.load_images(chunk).to(device)))]
        return results


def load_student(directory: str | Path, map_location: str | torch.device = "cpu") -> Student:
    """The student exported to ``directory`` (``config.json`` + ``model.safetensors``), in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} is not an exported student. "
                                    f"Write one with `python -m amalgam export --ckpt RUN.ckpt --out {directory}`.")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path} is not an amalgam student config of format version <= {FORMAT_VERSION} "
                         f"(format {config.get('format')!r}, version {config.get('format_version')!r}).")
    student = Student(config)
    student.model.load_state_dict(load_file(str(weights_path), device=str(map_location)))
    return student.to(map_location).eval()


# --------------------------------------------------------------------------------------------------------
# Export


def student_config_from_checkpoint(checkpoint: dict[str, Any], source: str = "") -> dict[str, Any]:
    """The ``config.json`` of the student in an AmalgamationModule checkpoint (the networks it recorded as
    built; the hyper-parameters in checkpoints written before it recorded them)."""
    hp = checkpoint.get("amalgam") or checkpoint.get("hyper_parameters") or {}
    if "student" not in hp or "teachers" not in hp:
        raise ValueError(f"{source or 'the checkpoint'} holds no AmalgamationModule hyper-parameters (student, "
                         f"teachers); export takes a .ckpt written by `python -m amalgam fit` of an "
                         f"AmalgamationModule.")
    student, tasks, start = hp["student"], [], 0
    for teacher in hp["teachers"]:
        classes = list(teacher["classes"])
        tasks.append({"name": teacher["task"], "classes": classes, "slice": [start, start + len(classes)]})
        start += len(classes)
    # Resolve the preprocessing the student trained with (config values, else the timm model's defaults).
    net = TappedNetwork(student["arch"], start, [], student.get("input_size"), student.get("mean"),
                        student.get("std"), student.get("model_kwargs"), owner=f"student ({student['arch']})")
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    from amalgam import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": student["arch"],
        "model_kwargs": dict(student.get("model_kwargs") or {}),
        "num_classes": start,
        "tasks": tasks,
        "preprocessing": {
            "input_size": net.input_size,
            "mean": [round(float(v), 6) for v in net.mean.flatten()],
            "std": [round(float(v), 6) for v in net.std.flatten()],
            # What the data pipeline did to image files before that: shorter side to image_size, center crop.
            "image_size": (checkpoint.get("amalgam") or {}).get("image_size") or data.get("image_size"),
            "input": "float RGB in [0, 1], NCHW (amalgam's Student also takes uint8); resized (bilinear, "
                     "antialiased) to input_size, then normalised",
        },
        "source": {"checkpoint": source, "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")},
        "amalgam_version": __version__,
    }


def export_student(ckpt: str | Path, out: str | Path, onnx: bool = False) -> Path:
    """Writes the student of AmalgamationModule checkpoint ``ckpt`` to folder ``out``; returns ``out``."""
    from safetensors.torch import save

    from amalgam.checkpointing import AtomicCheckpointIO

    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt)  # weights_only=True: refuses pickled code
    config = student_config_from_checkpoint(checkpoint, str(ckpt))
    state = {k[len(STUDENT_PREFIX):]: v for k, v in checkpoint.get("state_dict", {}).items()
             if k.startswith(STUDENT_PREFIX)}
    student = Student(config)
    missing = sorted(set(student.model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{ckpt}: the student's weights are incomplete (missing {missing[:5]}); "
                         f"was it saved with a different student architecture?")
    student.model.load_state_dict(state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ONNX_FILE).unlink(missing_ok=True)  # an earlier export's graph, which these weights would not match
    # clone(): safetensors refuses tensors that share storage (tied weights, views). Bytes written by Python,
    # not save_file, so the file gets the usual permissions (save_file makes it private to the owner).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.model.state_dict().items()}
    (out / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": FORMAT}))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if onnx:
        export_onnx(student.eval(), out / ONNX_FILE)
    return out


class _NormalizedStudent(nn.Module):
    """The ONNX graph: normalisation + network, for images already at ``input_size`` (resizing stays outside)."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student.model((images - self.student.mean) / self.student.std)


def export_onnx(student: Student, path: str | Path) -> Path:
    """``student`` as ONNX: input ``images`` float [B, 3, input_size, input_size] in [0, 1], output ``logits``
    [B, num_classes] (the union head; ``config.json`` says which slice is which task). Needs ``onnx``
    (``pip install -e '.[onnx]'``)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.export-based exporter writes through it)
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install -e '.[onnx]'") from err
    size = student.input_size
    example = torch.rand(2, 3, size, size)
    # torch.export-based exporter (the TorchScript one is deprecated); one file, any batch size.
    torch.onnx.export(_NormalizedStudent(student).eval(), (example,), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                      dynamo=True, external_data=False, verbose=False)
    return Path(path)


def export_main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m amalgam export",
        description="Write a trained student alone: weights (safetensors) and config (tasks, class names, "
                    "preprocessing); reload with amalgam.load_student(OUT).")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `python -m amalgam fit`")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json to")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx extra: pip install -e '.[onnx]')")
    args = parser.parse_args(argv)
    out = export_student(args.ckpt, args.out, onnx=args.onnx)
    print(f"student exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out
