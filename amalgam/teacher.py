"""Frozen teachers, described by plain arguments so checkpoints and configs stay readable and safe."""

from __future__ import annotations

from collections import Counter
from typing import Any, NotRequired, TypedDict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from amalgam.backbones import Features, Tap, TappedNetwork, load_weights, saved_hyperparameters


class TeacherConfig(TypedDict):
    """One teacher, as written in YAML under ``model.init_args.teachers``.

    task: name of the teacher's task (its slice of the union head carries this name).
    classes: the teacher's class names, in the order of its logits.
    arch: a timm model name, or ``package.module.Class`` of any nn.Module taking ``num_classes``.
    checkpoint: local weights (.safetensors, .pth state_dict, or a Lightning .ckpt; prefixes are stripped).
    checkpoint_prefix: the key prefix of the weights to load when a checkpoint holds several copies of the
      model (e.g. ``model.`` beside ``ema_model.``); default: found from the model's own key names.
    taps: where features are read, one per common-feature block (``pooled``, a stage name, or an index).
    input_size, mean, std: the teacher's own preprocessing; default: what a checkpoint written by
      ``amalgam.Classifier`` (or the student's, in an amalgamation checkpoint) saved, else the timm
      pretrained config.
    model_kwargs: extra keyword arguments for the model constructor (e.g. ``img_size``, ``patch_size``).
    """

    task: str
    classes: list[str]
    arch: str
    checkpoint: NotRequired[str | None]
    checkpoint_prefix: NotRequired[str | None]
    taps: NotRequired[list[Tap]]
    input_size: NotRequired[int | None]
    mean: NotRequired[list[float] | None]
    std: NotRequired[list[float] | None]
    model_kwargs: NotRequired[dict[str, Any]]


def saved_preprocessing(checkpoint: str) -> dict[str, Any]:
    """input_size, mean, std (and classes) that an amalgam checkpoint saved: an ``amalgam.Classifier``'s own,
    or an ``AmalgamationModule``'s student's. Other projects' hyper-parameters may use these names for other
    things (timm's ``input_size`` is ``[3, H, W]``): only well-formed values of amalgam's checkpoints count."""
    saved, built = saved_hyperparameters(checkpoint), saved_hyperparameters(checkpoint, "amalgam")
    if isinstance(built.get("student"), dict):  # a student used as a teacher (its network as built)
        saved = built["student"]
    elif isinstance(saved.get("student"), dict) and "teachers" in saved:  # the same, in an older checkpoint
        saved = saved["student"]
    elif not ("arch" in saved and "classes" in saved):
        return {}

    def numbers(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(
            isinstance(x, (int, float)) for x in value)

    out = {"classes": saved.get("classes")} if isinstance(saved.get("classes"), (list, tuple)) else {}
    if isinstance(saved.get("input_size"), int) and not isinstance(saved["input_size"], bool):
        out["input_size"] = saved["input_size"]
    out |= {k: list(saved[k]) for k in ("mean", "std") if numbers(saved.get(k))}
    return out


class Teacher(L.LightningModule):
    """A frozen expert: always in eval mode, no gradients, inference mode, never optimised or saved."""

    def __init__(self, task: str, classes: list[str], arch: str, checkpoint: str | None = None,
                 taps: list[Tap] | None = None, input_size: int | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None, model_kwargs: dict[str, Any] | None = None,
                 checkpoint_prefix: str | None = None) -> None:
        super().__init__()
        if not classes:
            raise ValueError(f"teacher {task!r}: 'classes' is empty; list the class names of its logits")
        repeated = [name for name, n in Counter(classes).items() if n > 1]
        if repeated:
            raise ValueError(f"teacher {task!r}: 'classes' lists {repeated} more than once ({list(classes)}); "
                             f"give each of its logits its own name")
        if checkpoint is not None and not str(checkpoint).strip():
            raise ValueError(f"teacher {task!r}: 'checkpoint' is an empty string (an unset variable?); give the "
                             f"path of its weights, or leave the key out for a randomly initialised teacher")
        if not checkpoint:
            rank_zero_warn(f"teacher {task!r} has no checkpoint: its weights are random, and a student learns "
                           f"nothing useful from it. Set its 'checkpoint' to the trained weights.")
        self.task = task
        self.classes = list(classes)
        # A checkpoint written by amalgam knows the preprocessing the network was trained with: a teacher at
        # the timm defaults instead (224 px, ImageNet statistics) would run but answer poorly.
        saved = saved_preprocessing(checkpoint) if checkpoint else {}
        # `is None`, not `or`: a given 0 or [] is a mistake for TappedNetwork to name, not a value to replace.
        input_size = saved.get("input_size") if input_size is None else input_size
        mean, std = saved.get("mean") if mean is None else mean, saved.get("std") if std is None else std
        if saved.get("classes") and list(saved["classes"]) != self.classes:
            rank_zero_warn(f"teacher {task!r}: classes {self.classes} differ from those its checkpoint was trained "
                           f"on, {list(saved['classes'])}: the logits are read in the order given here.")
        self.net = TappedNetwork(arch, len(self.classes), ["pooled"] if taps is None else taps, input_size, mean, std,
                                 model_kwargs, owner=f"teacher {task!r} ({arch})")
        if checkpoint:
            load_weights(self.net.model, checkpoint, f"teacher {task!r}", num_classes=len(self.classes),
                         prefix=checkpoint_prefix)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_config(cls, config: TeacherConfig) -> Teacher:
        unknown = set(config) - set(TeacherConfig.__annotations__)
        if unknown:
            raise ValueError(f"teacher config has unknown keys {sorted(unknown)}; "
                             f"valid keys: {sorted(TeacherConfig.__annotations__)}")
        return cls(**config)

    def train(self, mode: bool = True) -> Teacher:
        # Lightning calls .train() on everything at fit start; a teacher stays in eval (BN stats, dropout).
        return super().train(False)

    def forward(self, images: Tensor) -> Features:
        weight = next(self.net.parameters(), None)
        low_precision = weight is not None and weight.dtype in (torch.bfloat16, torch.float16)
        with torch.inference_mode():
            out = self.net(images)  # it casts to its own dtype after resizing (TappedNetwork.preprocess)
        # Inference tensors cannot enter autograd (the adapters and the KD target need them): one cheap copy,
        # in the images' dtype for a teacher held in bf16/fp16, so the adapters see their own dtype: float32
        # with model.teacher_dtype, bf16 when the whole module runs in bf16 (trainer precision bf16-true).
        # Always a copy: under CUDA autocast some outputs are float32 already (layer norm), and .float() would
        # hand back the inference tensor itself.
        copy = (lambda t: t.to(images.dtype, copy=True)) if low_precision else (lambda t: t.clone())
        return Features([copy(t) for t in out.taps], copy(out.logits))
