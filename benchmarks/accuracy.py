"""Accuracy of amalgamated students against the paper's baselines, on real Fashion-MNIST.

    python benchmarks/accuracy.py                      # CPU preset: slim models, a process per core (33 min on 2 cores)
    python benchmarks/accuracy.py --preset gpu         # the full schedule (resnet18 student, 30 epochs)
    python benchmarks/accuracy.py --preset cpu_bn      # the CPU preset with BatchNorm teachers only
    python benchmarks/accuracy.py --settings S2 --seeds 0 --methods kd_slice amalgam   # a slice of the grid
    python benchmarks/accuracy.py --preset gpu --methods amalgam_long   # any preset in configs/presets/
    python benchmarks/accuracy.py --methods amalgam --loss-weights '{entropy: 0.3}'   # one weight changed
    python benchmarks/accuracy.py --methods amalgam --module-args '{temperature: 2.0}'  # another argument
    bash benchmarks/accuracy_gpu.sh OUT_DIR                 # the GPU grid: a process per teacher, then per seed
    python benchmarks/accuracy.py --from-runs OUT_DIR/runs.jsonl   # summarise runs logged by --runs-log
    python benchmarks/accuracy.py --from-runs runs.jsonl --paired amalgam   # plus each method - amalgam, per seed

Settings: S2 = tasks {0-4}, {5-9}; S3 = {0-3}, {4-6}, {7-9}. Teachers of different families are trained once per
setting and seed, with labels on their own task only (cached under --work). Every student method starts from
the same initial weights and sees the same batches and augmented views (teachers see the same view).

Writes benchmarks/results/accuracy.json (contract: {"<setting>": {"teachers": {"<task>": acc},
"<method>": {"tasks": {...}, "acc_all", "acc_union", "acc_union_balanced", "std": {...}}}}, fractions) and
prints a Markdown table for benchmarks/RESULTS.md. Each line of --runs-log also keeps that run's task-agnostic
confusion matrix ("union_confusion": test images, true class by predicted class), from which the summary lists
the largest errors into another task's classes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amalgam import AmalgamationModule, Classifier
from amalgam.data import FASHION_MNIST_CLASSES, FashionMNISTDataModule
from amalgam.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from amalgam.data.in_memory import InMemoryImages
from amalgam.export import export_student

SETTINGS = {"S2": {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},
            "S3": {"a": [0, 1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9]}}
GRAY = {"mean": [0.286] * 3, "std": [0.353] * 3}

# Model families per preset. The CPU preset is sized for 2 cores; the GPU preset is the full schedule.
PRESETS = {
    "cpu": {
        "teachers": [
            {"arch": "resnet10t", "model_kwargs": {"channels": [32, 64, 128, 256]}, "input_size": 28, **GRAY},
            {"arch": "vit_tiny_patch16_224", "input_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3,
             "model_kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 4, "num_heads": 3}},
            {"arch": "convnext_atto", "input_size": 32, **GRAY,
             "model_kwargs": {"dims": [32, 64, 128, 160], "depths": [1, 1, 2, 1]}},
        ],
        "student": {"arch": "resnet18", "model_kwargs": {"channels": [32, 64, 128, 256]}, "input_size": 28, **GRAY},
        # Teachers see all of their task's images; students a fixed subset of the unlabeled pool.
        "teacher_epochs": 2, "student_epochs": 2, "train_limit": 20000, "teacher_train_limit": None,
        "batch_size": 128,
    },
    # The CPU preset with every teacher a BatchNorm network of its own family (ResNet, RegNet, MobileNetV3), where
    # the BatchNorm task gate (loss_weights.task_gate) reads every teacher, not only the ResNet.
    "cpu_bn": {
        "teachers": [
            {"arch": "resnet10t", "model_kwargs": {"channels": [32, 64, 128, 256]}, "input_size": 28, **GRAY},
            {"arch": "regnetx_002", "input_size": 28, **GRAY},
            {"arch": "mobilenetv3_small_100", "input_size": 32, **GRAY},
        ],
        "student": {"arch": "resnet18", "model_kwargs": {"channels": [32, 64, 128, 256]}, "input_size": 28, **GRAY},
        "teacher_epochs": 2, "student_epochs": 2, "train_limit": 20000, "teacher_train_limit": None,
        "batch_size": 128,
    },
    "gpu": {
        "teachers": [
            {"arch": "amalgam_resnet10t_nopool", "input_size": 28, **GRAY},
            {"arch": "vit_tiny_patch16_224", "input_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3,
             "model_kwargs": {"img_size": 28, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}},
            {"arch": "convnext_atto", "input_size": 32, **GRAY},
        ],
        "student": {"arch": "amalgam_resnet18_nopool", "input_size": 28, **GRAY},
        "teacher_epochs": 20, "student_epochs": 30, "train_limit": None, "teacher_train_limit": None,
        "batch_size": 256,
        # Channels-last sends depthwise and small convolutions to cuDNN's fast kernels in bf16; in NCHW the
        # ConvNeXt teacher trained ~8x slower per image than the others on an H200.
        "channels_last": True,
    },
}

# Student methods are the library's presets (configs/presets/<method>.yaml): their loss choices only, so every
# method shares the optimiser and schedule. "supervised" is the all-labels upper bound.
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
METHOD_KEYS = ("kd", "temperature", "loss_weights", "mmd_bandwidths", "teacher_flip_average")
METHODS = ["supervised", "kd_concat", "kd_slice", "cfl_paper", "amalgam"]
# The other presets (amalgam_selflabel, amalgam_long) run as methods under their file names.
PRESET_METHODS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem not in METHODS)
# Ablations of the amalgam preset: each switches one of its ideas off (-) or an optional one on (+), by loss
# weights or other module arguments. "+ema" evaluates an exponential moving average of the student's weights
# (Lightning's EMAWeightAveraging, time constant a tenth of the run's steps).
ABLATIONS = {
    "amalgam+selflabel": {"loss_weights": {"selflabel": 1.0}},
    "amalgam+selflabel_task": {"loss_weights": {"selflabel": 1.0}, "selflabel_target": "task"},
    "amalgam+contrast": {"loss_weights": {"contrast": 1.0}},
    "amalgam+selflabel+contrast": {"loss_weights": {"selflabel": 1.0, "contrast": 1.0}},
    "amalgam+kd_task_weighting": {"kd_task_weighting": 1.0},
    "amalgam-no_cfl": {"loss_weights": {"mmd": 0.0, "recon": 0.0}},
    "amalgam-no_prior": {"loss_weights": {"balance": 0.0, "entropy": 0.0}},
    "amalgam-no_entropy": {"loss_weights": {"entropy": 0.0}},
    "amalgam+teacher_flip": {"teacher_flip_average": True},
    "amalgam+mixup": {"mixup_alpha": 1.0},
    "amalgam+strong_view": {"shared_strong_view": True},
    # Born-again: also imitate the union softmax of a student trained first (REBORN_FROM; run_one trains it).
    "amalgam+reborn": {"loss_weights": {"union_kd": 1.0}},
    "amalgam+reborn_from_selflabel": {"loss_weights": {"union_kd": 1.0}},
    "amalgam+neighbour": {"loss_weights": {"neighbour": 1.0}},
    # The BatchNorm task gate at 0.3, a light pull: the gate is a guess about the task, not a label.
    "amalgam+task_gate": {"loss_weights": {"task_gate": 0.3}},
    "amalgam+selflabel+task_gate": {"loss_weights": {"selflabel": 1.0, "task_gate": 0.3}},
    # The gates' odds multiply the student's own task distribution: a gate that tells nothing does nothing.
    "amalgam+selflabel+task_gate_product": {"loss_weights": {"selflabel": 1.0, "task_gate": 1.0},
                                            "task_gate_target": "product"},
    "amalgam+ema": {},
}
REBORN_FROM = {"amalgam+reborn": "amalgam", "amalgam+reborn_from_selflabel": "amalgam+selflabel"}


def method_args(method: str) -> dict:
    base = "kd_slice" if method == "supervised" else method.split("-")[0].split("+")[0]
    init_args = yaml.safe_load((PRESET_DIR / f"{base}.yaml").read_text())["model"]["init_args"]
    args = {k: copy.deepcopy(init_args[k]) for k in METHOD_KEYS if k in init_args}
    changes = copy.deepcopy(ABLATIONS.get(method, {}))
    args["loss_weights"] = {**args.get("loss_weights", {}), **changes.pop("loss_weights", {})}
    return args | changes


class EpochClock(L.Callback):
    """Prints each training epoch's wall time and images/s, so a log shows where a run's time went."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        print(f"[accuracy] {type(pl_module).__name__} epoch {trainer.current_epoch}: {seconds:.1f} s, "
              f"{self.images / seconds:.0f} img/s", flush=True)


def trainer(epochs: int, root: Path, callbacks: list | None = None) -> L.Trainer:
    cuda = torch.cuda.is_available()
    return L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     callbacks=[EpochClock(), *(callbacks or [])],
                     enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root),
                     benchmark=cuda,  # fixed shapes: let cuDNN time its algorithms once
                     precision="bf16-mixed" if cuda else "32-true")


def train_teacher(setting: str, task: str, family: dict, seed: int, preset: dict, work: Path) -> Path:
    # The file name carries what shapes a teacher, so a changed preset never reuses a stale one.
    limit = preset["teacher_train_limit"] or "all"
    path = work / f"{setting}-seed{seed}-teacher-{task}-{family['arch']}-e{preset['teacher_epochs']}-n{limit}.ckpt"
    if path.exists():
        return path
    L.seed_everything(seed, verbose=False)
    classes = [FASHION_MNIST_CLASSES[i] for i in SETTINGS[setting][task]]
    model = Classifier(classes=classes, task=task, lr=3e-3, channels_last=preset.get("channels_last", False),
                       **family)
    data = FashionMNISTDataModule(preset["root"], SETTINGS[setting], supervised_task=task, batch_size=preset["batch_size"],
                                  train_limit=preset["teacher_train_limit"], seed=seed)
    t = trainer(preset["teacher_epochs"], work)
    t.fit(model, datamodule=data)
    partial = path.with_suffix(".partial")  # a process stopped mid-write leaves no file that looks finished
    t.save_checkpoint(partial, weights_only=False)
    partial.rename(path)
    return path


def teacher_configs(setting: str, seed: int, preset: dict, work: Path) -> list[dict]:
    configs = []
    for (task, ids), family in zip(SETTINGS[setting].items(), preset["teachers"]):
        ckpt = train_teacher(setting, task, family, seed, preset, work)
        configs.append({"task": task, "classes": [FASHION_MNIST_CLASSES[i] for i in ids],
                        "checkpoint": str(ckpt), "taps": ["pooled"], **family})
    return configs


def build_student(method: str, teachers: list[dict], preset: dict, seed: int,
                  extra: dict | None = None) -> AmalgamationModule:
    args = method_args(method)
    args["loss_weights"] |= preset.get("loss_weights", {})
    cls = Supervised if method == "supervised" else AmalgamationModule
    L.seed_everything(seed, verbose=False)  # same student init for every method (teachers, then student)
    # A NaN check syncs with the device; every step would stall a GPU's queue of launches.
    defaults = {"lr": 2e-3, "evaluate_teachers": False, "nan_check_every_n_steps": 100,
                "channels_last": preset.get("channels_last", False)}
    args = defaults | args | preset.get("module_args", {}) | (extra or {})
    return cls(teachers, {**preset["student"], "taps": ["pooled"]}, **args)


class Supervised(AmalgamationModule):
    """The upper bound: the same student and batches, trained with all labels (cross-entropy on the union)."""

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss.detach())
        return loss


class UnionLabels(FashionMNISTDataModule):
    """The same training rows in the same order, with union labels: for the supervised bound only."""

    def _build_train_set(self) -> InMemoryImages:
        images, labels = load_fashion_mnist(self.root, "train")
        class_ids = [i for ids in self.tasks.values() for i in ids]
        rows = self._rows_of(labels, class_ids, self.train_limit)
        return InMemoryImages(images[rows].unsqueeze(1), self._label_table(class_ids)[labels[rows]])


@torch.inference_mode()
def logits_of(fn, images: torch.Tensor, device: torch.device, batch: int = 1000) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).float().div(255)
        out.append(fn(x).float().cpu())
    return torch.cat(out)


def balance_offsets(logits: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Label-free per-class offsets that make the mean prediction on unlabeled images uniform."""
    offset = torch.zeros(logits.shape[1])
    target = torch.full((logits.shape[1],), 1.0 / logits.shape[1])
    for _ in range(iterations):
        mean_p = (logits + offset).softmax(1).mean(0)
        offset -= (mean_p / target).log()
    return offset


def union_test_set(setting: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The setting's test images (uint8 [N, 3, 28, 28]) and their union labels (class index over all tasks)."""
    test_x, test_y = load_fashion_mnist(root, "test")
    ids = [i for t in SETTINGS[setting].values() for i in t]
    union_label = torch.full((10,), -1, dtype=torch.long)
    union_label[ids] = torch.arange(len(ids))
    keep = union_label[test_y] >= 0
    return test_x[keep][:, None].expand(-1, 3, -1, -1), union_label[test_y[keep]]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """[k, k] counts, rows the true class, columns the predicted one."""
    return torch.bincount(target * k + pred, minlength=k * k).view(k, k)


def evaluate(model: AmalgamationModule, setting: str, pool: torch.Tensor, root: str) -> dict:
    device = model.device
    model.eval()
    x, y = union_test_set(setting, root)
    z = logits_of(model, x, device)
    offset = balance_offsets(logits_of(model, pool, device))
    result = {"tasks": {}}
    correct_aware = 0
    for task, (a, b) in zip(model.task_names, model.slices):
        in_task = (y >= a) & (y < b)
        hits = (z[in_task, a:b].argmax(1) == y[in_task] - a)
        result["tasks"][task] = hits.float().mean().item()
        correct_aware += hits.sum().item()
    result["acc_all"] = correct_aware / len(y)
    result["acc_union"] = (z.argmax(1) == y).float().mean().item()
    result["acc_union_balanced"] = ((z + offset).argmax(1) == y).float().mean().item()
    # Kept with every run, so where the task-agnostic errors go can be read later without the model.
    result["union_confusion"] = confusion_matrix(z.argmax(1), y, z.shape[1]).tolist()
    teacher_logits = [logits_of(lambda im, t=t: t(im).logits, x, device) for t in model.teachers]
    result["teachers"] = {}
    for t, (a, b), zt in zip(model.teachers, model.slices, teacher_logits):
        in_task = (y >= a) & (y < b)
        result["teachers"][t.task] = (zt[in_task].argmax(1) == y[in_task] - a).float().mean().item()
    result["teachers_concat"] = (torch.cat(teacher_logits, 1).argmax(1) == y).float().mean().item()
    return result


def fit_student(method: str, setting: str, seed: int, preset: dict, work: Path, teachers: list[dict],
                extra: dict | None = None) -> tuple[AmalgamationModule, L.Trainer, FashionMNISTDataModule]:
    model = build_student(method, teachers, preset, seed, extra)
    cls = UnionLabels if method == "supervised" else FashionMNISTDataModule
    data = cls(preset["root"], SETTINGS[setting], batch_size=preset["batch_size"], train_limit=preset["train_limit"],
               seed=seed)
    L.seed_everything(seed, verbose=False)  # same batch order and augmentations for every method
    callbacks = []
    if method == "amalgam+ema":
        steps = (preset["train_limit"] or 60000) // preset["batch_size"] * preset["student_epochs"]
        callbacks.append(EMAWeightAveraging(decay=max(0.5, 1 - 10 / steps)))  # short runs: keep it a decay
    t = trainer(preset["student_epochs"], work, callbacks)
    t.fit(model, datamodule=data)
    return model, t, data


def first_generation(setting: str, seed: int, preset: dict, work: Path, teachers: list[dict],
                     method: str = "amalgam") -> Path:
    """A `method` student of this setting, seed and preset, exported: the union teacher of a born-again student.
    Cached under ``work`` by a digest of everything that shapes it."""
    shape = {k: preset.get(k) for k in ("student", "student_epochs", "train_limit", "batch_size", "loss_weights",
                                        "module_args", "channels_last")}
    # The method's own arguments too: an edited preset must not reuse a student of the old one.
    digest = hashlib.sha1(json.dumps([shape, teachers, method_args(method)], sort_keys=True,
                                     default=str).encode()).hexdigest()[:10]
    out = work / f"{setting}-seed{seed}-{method.replace('+', '_')}-student-{digest}"
    if (out / "config.json").exists():
        return out
    _, t, _ = fit_student(method, setting, seed, preset, work, teachers)
    ckpt = out.with_suffix(".ckpt")
    t.save_checkpoint(ckpt, weights_only=False)
    export_student(ckpt, out.with_suffix(".partial"))  # a process stopped mid-write leaves no finished-looking dir
    out.with_suffix(".partial").rename(out)
    ckpt.unlink()
    return out


def run_one(setting: str, method: str, seed: int, preset: dict, work: Path) -> dict:
    teachers = teacher_configs(setting, seed, preset, work)
    start = time.perf_counter()  # a born-again student's time includes its first generation's, unless cached
    extra = {}
    if method in REBORN_FROM:
        extra["union_teacher"] = str(first_generation(setting, seed, preset, work, teachers, REBORN_FROM[method]))
    model, t, data = fit_student(method, setting, seed, preset, work, teachers, extra)
    data.setup("fit")
    pool = data.train_set.images[:10000].expand(-1, 3, -1, -1)  # unlabeled images, for balancing only
    result = evaluate(model.to(t.strategy.root_device), setting, pool, preset["root"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def aggregate(runs: list[dict]) -> dict:
    def mean_std(values):
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out, std = {"tasks": {}}, {"tasks": {}}
    for task in runs[0]["tasks"]:
        out["tasks"][task], std["tasks"][task] = mean_std([r["tasks"][task] for r in runs])
    for key in ("acc_all", "acc_union", "acc_union_balanced"):
        out[key], std[key] = mean_std([r[key] for r in runs])
    out["std"] = std
    out["seeds"] = len(runs)
    return out


METRICS = ("acc_all", "acc_union", "acc_union_balanced")


def header(tasks: list[str], leads: tuple[str, ...] = ("method",)) -> list[str]:
    """A results table's Markdown header: the `leads` columns, one per task, then the all-task metrics."""
    cells = [*leads, *(f"task {t}" for t in tasks), "all, task-aware", "task-agnostic raw", "task-agnostic balanced"]
    return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]


def table(results: dict) -> str:
    lines = []
    for setting, res in results.items():
        tasks = list(res["teachers"])
        lines += [f"\n**{setting}** (teachers: " + ", ".join(f"{t} {100 * a:.2f}" for t, a in res["teachers"].items())
                  + f"; teachers concatenated, task-agnostic {100 * res['teachers_concat']:.2f})", "",
                  *header(tasks, ("method", "seeds"))]
        for method, m in res.items():
            if method in ("teachers", "teachers_concat"):
                continue

            def cell(mean: float, std: float, n: int = m["seeds"]) -> str:  # sample std over seeds; none for one
                return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"

            cells = [cell(m["tasks"][t], m["std"]["tasks"][t]) for t in tasks]
            cells += [cell(m[k], m["std"][k]) for k in METRICS]
            lines.append(f"| {method} | {m['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(runs: list[dict], baseline: str) -> str:
    """Per seed, every other method minus `baseline` on the same setting and seed (so on the same teachers and
    batches), in points; then the mean over the seeds both ran. Seeds only one of the two ran are left out."""
    def values(run: dict) -> list[float]:  # in the header's column order
        return [100 * a for a in run["tasks"].values()] + [100 * run[k] for k in METRICS]

    lines = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        base = {r["seed"]: r for r in mine if r["method"] == baseline}
        others = [m for m in dict.fromkeys(r["method"] for r in mine) if m != baseline]
        if not base or not others:
            continue
        tasks = list(next(iter(base.values()))["tasks"])
        lines += [f"\n**{setting}, paired with {baseline}** (points, same seed)", "", *header(tasks, ("method", "seed"))]
        for method in others:
            runs_of = sorted((r for r in mine if r["method"] == method and r["seed"] in base), key=lambda r: r["seed"])
            rows = [(r["seed"], [a - b for a, b in zip(values(r), values(base[r["seed"]]))]) for r in runs_of]
            if len(rows) > 1:
                rows.append(("mean", [statistics.fmean(column) for column in zip(*(d for _, d in rows))]))
            lines += [f"| {method} | {seed} | " + " | ".join(f"{d:+.2f}" for d in row) + " |" for seed, row in rows]
    return "\n".join(lines)


def cross_task_errors(runs: list[dict], top: int = 4) -> str:
    """Where the task-agnostic errors go, from the runs' union confusions: per setting and method, the share of
    test images given a class of another task, and the largest such (true -> predicted) pairs, mean over seeds."""
    runs = [r for r in runs if "union_confusion" in r]  # runs logged before confusions were kept have none
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        ids = [i for task in SETTINGS[setting].values() for i in task]
        names = [FASHION_MNIST_CLASSES[i] for i in ids]
        task_of = torch.tensor([n for n, task in enumerate(SETTINGS[setting].values()) for _ in task])
        other_task = task_of[:, None] != task_of[None, :]
        lines += [f"\n**{setting}, errors into another task's classes** (% of test images, mean over seeds)", ""]
        for method in dict.fromkeys(r["method"] for r in runs if r["setting"] == setting):
            confusions = [torch.tensor(r["union_confusion"], dtype=torch.float) for r in runs
                          if r["setting"] == setting and r["method"] == method]
            share = 100 * torch.stack([c / c.sum() for c in confusions]).mean(0) * other_task
            pairs = share.flatten().topk(top)
            worst = ", ".join(f"{names[i // len(ids)]} -> {names[i % len(ids)]} {v:.2f}"
                              for v, i in zip(pairs.values.tolist(), pairs.indices.tolist()))
            lines.append(f"- {method}: {share.sum():.2f} in all; {worst}")
    return "\n".join(lines)


def check_runs(runs: list[dict]) -> None:
    """Refuses what would silently skew a summary: a (setting, method, seed) run twice (it would count as two
    seeds), or runs of one setting from different schedules (their teachers and students are not comparable).
    Runs logged before schedules were kept carry none and pass."""
    seen: dict[tuple, int] = {}
    for r in runs:
        key = (r["setting"], r["method"], r["seed"])
        seen[key] = seen.get(key, 0) + 1
    repeated = [f"{s} {m} seed {seed} (x{n})" for (s, m, seed), n in seen.items() if n > 1]
    if repeated:
        raise ValueError(f"runs logged more than once: {', '.join(repeated)}; keep one line of each (a --runs-log "
                         f"file appended to by two grids?)")
    for setting in dict.fromkeys(r["setting"] for r in runs):
        schedules = {json.dumps(r["schedule"], sort_keys=True) for r in runs
                     if r["setting"] == setting and r.get("schedule") is not None}
        if len(schedules) > 1:
            raise ValueError(f"{setting}: runs of different schedules {sorted(schedules)}; summarise each on its own")


def summarize(runs: list[dict]) -> dict:
    """Per-run results (each with "setting", "method", "seed") -> the accuracy.json contract, settings and methods
    in the order first met."""
    results: dict = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        methods = dict.fromkeys(r["method"] for r in mine)
        # Teachers are shared by every method of a seed: average them over seeds, once per seed.
        per_seed = list({r["seed"]: r for r in mine}.values())
        results[setting] = {
            "teachers": {t: statistics.fmean(r["teachers"][t] for r in per_seed) for t in per_seed[0]["teachers"]},
            "teachers_concat": statistics.fmean(r["teachers_concat"] for r in per_seed),
            **{m: aggregate([r for r in mine if r["method"] == m]) for m in methods},
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + PRESET_METHODS + list(ABLATIONS),
                   help="methods to run: the presets in configs/presets/, and ablations of the amalgam preset: "
                   + ", ".join(ABLATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--student-epochs", type=int, help="override the preset")
    p.add_argument("--teacher-epochs", type=int, help="override the preset")
    p.add_argument("--train-limit", type=int, help="override the preset (0 = all images)")
    p.add_argument("--teacher-train-limit", type=int, help="override the preset (0 = all images)")
    p.add_argument("--student", type=yaml.safe_load, default=None,
                   help="YAML mapping that replaces keys of the preset's student, e.g. '{arch: "
                        "amalgam_resnet14_nopool, model_kwargs: {channels: [16, 32, 64, 128], stem_width: 32}}'")
    p.add_argument("--loss-weights", type=yaml.safe_load, default=None,
                   help="YAML mapping that replaces loss weights of every method, e.g. '{entropy: 0.3}'; the "
                        "methods are then reported as '<method> <mapping>'")
    p.add_argument("--module-args", type=yaml.safe_load, default=None,
                   help="YAML mapping of other AmalgamationModule arguments for every method, e.g. '{temperature: "
                        "8}'; reported like --loss-weights")
    p.add_argument("--data-root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--work", default="artifacts/bench-accuracy", help="teacher checkpoints are cached here")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    p.add_argument("--runs-log", help="append each finished run to this JSON-lines file as it ends, so a run "
                                      "that is stopped midway keeps what it finished (with --jobs: as each "
                                      "process ends; each keeps its own as they end, under --work/<preset>/logs)")
    p.add_argument("--teachers-only", action="store_true",
                   help="train (or find cached under --work) the teachers of --settings and --seeds, then stop; "
                        "a later run with the same --work reuses them")
    p.add_argument("--tasks", nargs="+", help="with --teachers-only: only these tasks' teachers (e.g. c), so that "
                                              "several processes can train one setting's teachers at once")
    p.add_argument("--from-runs", nargs="+", metavar="JSONL",
                   help="train nothing: summarise runs logged by --runs-log (several machines or processes)")
    p.add_argument("--paired", metavar="METHOD",
                   help="also print every other method minus METHOD per seed (same setting and seed: same teachers "
                        "and batches), the way to compare two methods when the teachers vary between seeds")
    p.add_argument("--jobs", type=int,
                   help="processes at once, each running one (setting, seed) of the grid; default: one per CPU core "
                        "on the CPU presets (one thread each, so runs are deterministic), one on the GPU preset")
    p.add_argument("--logged-command", help=argparse.SUPPRESS)  # a --jobs worker logs its parent's command
    args = p.parse_args(argv)
    command = args.logged_command or " ".join(["python benchmarks/accuracy.py",
                                               *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    if args.teachers_only:
        train_teachers(args)
        return {}
    if args.from_runs:
        runs = [json.loads(line) for f in args.from_runs for line in Path(f).read_text().splitlines() if line]
        failed = []
        meta = {k: runs[0].get(k) for k in ("preset", "device", "torch")}
        meta["seeds"] = sorted({r["seed"] for r in runs})
        meta["seconds"] = round(sum(r["seconds"] for r in runs))  # summed over runs, not wall time
    else:
        units = [(setting, seed) for setting in args.settings for seed in args.seeds]
        jobs = min(args.jobs or (1 if args.preset == "gpu" else os.cpu_count() or 1), len(units))
        runs, failed = run_parallel(args, command, units, jobs) if jobs > 1 else (run_grid(args, command), [])
        meta = {k: runs[0][k] for k in ("preset", "device", "torch")} if runs else {}
        meta["seeds"] = args.seeds
        meta["seconds"] = round(time.perf_counter() - start)
        if failed and not runs:
            raise SystemExit("\n".join(failed))
    check_runs(runs)
    results = summarize(runs)
    results["_meta"] = {**meta, "command": command}
    print(table({k: v for k, v in results.items() if not k.startswith("_")}))
    if errors := cross_task_errors(runs):
        print(errors)
    if args.paired:
        print(paired_table(runs, args.paired))
    if failed:  # what finished is shown above; a partial grid is not written over --out
        raise SystemExit("\n".join([*failed, f"[accuracy] {args.out} not written: the finished runs are in the "
                                               f"logs named above (python benchmarks/accuracy.py --from-runs ...)"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out} ({results['_meta']['seconds']} s of runs)")
    return results


def grid_preset(args: argparse.Namespace) -> tuple[dict, Path]:
    """The preset with the command line's overrides, and the folder of its cached teachers."""
    preset = dict(PRESETS[args.preset], root=args.data_root)
    for key in ("student_epochs", "teacher_epochs", "train_limit", "teacher_train_limit"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key) or None
    if args.student:
        preset["student"] = {**preset["student"], **args.student}
    if args.loss_weights:
        preset["loss_weights"] = args.loss_weights
    if args.module_args:
        preset["module_args"] = args.module_args
    work = Path(args.work) / args.preset
    work.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    return preset, work


def train_teachers(args: argparse.Namespace) -> None:
    preset, work = grid_preset(args)
    for setting in args.settings:
        for seed in args.seeds:
            for (task, _), family in zip(SETTINGS[setting].items(), preset["teachers"]):
                if not args.tasks or task in args.tasks:
                    path = train_teacher(setting, task, family, seed, preset, work)
                    print(f"[accuracy] {setting} seed {seed} teacher {task}: {path}", flush=True)


SCHEDULE_KEYS = ("teacher_epochs", "student_epochs", "train_limit", "teacher_train_limit", "batch_size", "student")


def run_grid(args: argparse.Namespace, command: str = "") -> list[dict]:
    preset, work = grid_preset(args)
    # Kept with every run, so runs of different schedules are never summarised or paired as one.
    schedule = {k: preset.get(k) for k in SCHEDULE_KEYS}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    runs = []
    for setting in args.settings:
        for seed in args.seeds:
            for method in args.methods:
                r = run_one(setting, method, seed, preset, work)
                changed = (args.loss_weights or {}) | (args.module_args or {})
                name = f"{method} {yaml.safe_dump(changed, default_flow_style=True).strip()}" if changed else method
                r |= {"setting": setting, "method": name, "seed": seed, "preset": args.preset,
                      "schedule": schedule, "command": command, "device": device, "torch": torch.__version__}
                runs.append(r)
                print(f"[accuracy] {setting} seed {seed} {name}: tasks {r['tasks']} all {r['acc_all']:.4f} "
                      f"union {r['acc_union']:.4f} balanced {r['acc_union_balanced']:.4f} ({r['seconds']} s)",
                      flush=True)
                if args.runs_log:
                    with open(args.runs_log, "a") as f:  # one short append per line: safe across processes
                        f.write(json.dumps(r) + "\n")
    return runs


def worker_args(args: argparse.Namespace, setting: str, seed: int, runs_log: Path, command: str) -> list[str]:
    """The command line of a --jobs worker: this grid's options for one setting and seed, in one process."""
    argv = ["--preset", args.preset, "--settings", setting, "--seeds", str(seed), "--methods", *args.methods,
            "--data-root", args.data_root, "--work", args.work, "--jobs", "1", "--runs-log", str(runs_log),
            "--out", str(runs_log.with_suffix(".json")), "--logged-command", command]
    for key in ("student_epochs", "teacher_epochs", "train_limit", "teacher_train_limit"):
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("student", "loss_weights", "module_args"):
        if getattr(args, key):
            argv += [f"--{key.replace('_', '-')}", yaml.safe_dump(getattr(args, key), default_flow_style=True)]
    return argv


def run_parallel(args: argparse.Namespace, command: str, units: list[tuple[str, int]],
                 jobs: int) -> tuple[list[dict], list[str]]:
    """Runs each (setting, seed) of the grid in its own process, `jobs` at a time, and collects their runs.

    A (setting, seed) is the natural unit: its methods share teachers and batches, and no two units write the
    same cached file. Each process gets an equal share of the cores; its output goes to a log under --work, and
    its [accuracy] lines are echoed here. Returns the finished runs and a line per failed unit."""
    logs = Path(args.work) / args.preset / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    print(f"[accuracy] {len(units)} (setting, seed) units, {jobs} processes at once, {env['OMP_NUM_THREADS']} "
          f"thread(s) each; logs in {logs}", flush=True)
    lock, runs, failed, done = threading.Lock(), [], [], [0]

    def unit(setting: str, seed: int) -> None:
        name = f"{setting}-seed{seed}"
        runs_log, log = logs / f"{name}.jsonl", logs / f"{name}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), *worker_args(args, setting, seed, runs_log, command)]
        with open(log, "w") as f, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True, env=env) as proc:
            for line in proc.stdout:
                f.write(line)
                if line.startswith("[accuracy]"):
                    print(f"[{setting} seed {seed}] {line}", end="", flush=True)
        finished = [json.loads(line) for line in runs_log.read_text().splitlines()] if runs_log.exists() else []
        with lock:
            runs.extend(finished)
            if args.runs_log and finished:
                with open(args.runs_log, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in finished)
            done[0] += 1
            if proc.returncode:
                failed.append(f"[accuracy] {setting} seed {seed} failed (exit {proc.returncode}) after "
                              f"{len(finished)} of {len(args.methods)} methods; its log: {log}")
            print(f"[accuracy] {setting} seed {seed}: {'failed' if proc.returncode else 'done'} "
                  f"({done[0]}/{len(units)} units)", flush=True)

    # Three-task units take longest: start them first, so no process is left alone with one at the end.
    order = sorted(units, key=lambda u: -len(SETTINGS[u[0]]))
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(unit, *u) for u in order]:
            future.result()
    # The grid's order, not the order the units finished in.
    runs.sort(key=lambda r: (units.index((r["setting"], r["seed"])), args.methods.index(r["method"].split(" ")[0])))
    return runs, failed


if __name__ == "__main__":
    main()
