"""``AmalgamationModule``: one student learns every frozen teacher's task from unlabeled images.

Read top to bottom: construction (teachers, student, common-feature blocks, losses, metrics), the training
step as a chain of small hooks a subclass may override, evaluation, optimisers.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NotRequired, TypedDict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import AttributeDict, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from amalgam.backbones import Features, Tap, TappedNetwork, classifier_of
from amalgam.checkpointing import seed_training_batch
from amalgam.common_feature import CommonFeatureBlock, CommonFeatures
from amalgam.data.augment import mix_images, strong_view
from amalgam.export import Student, load_student
from amalgam.losses import (
    PAPER_BANDWIDTHS,
    MultiBandwidthMMD,
    NeighbourConsistency,
    ReconstructionLoss,
    SelfLabel,
    SoftTargetKD,
    TaskGate,
    UnionPrior,
    ViewContrast,
    batch_mean,
    batchnorm_moments,
    gated_task_loss,
    slice_mass,
)
from amalgam.teacher import Teacher, TeacherConfig
from amalgam.teacher_cache import TeacherCache

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The authors' code: L_KD + 10 (L_M + L_R). The union-prior terms (balance, entropy), self-labelling, view
# contrast, neighbour consistency, born-again imitation and the BatchNorm task gate are ours, off by default.
DEFAULT_WEIGHTS = {"kd": 1.0, "mmd": 10.0, "recon": 10.0, "balance": 0.0, "entropy": 0.0, "selflabel": 0.0,
                   "contrast": 0.0, "neighbour": 0.0, "union_kd": 0.0, "task_gate": 0.0}
# Terms that train only a module of their own, never the student: their scale does not matter, weight 1.
UNWEIGHTED = {"task_gate_fit"}


class StudentConfig(TypedDict):
    """The student, as written in YAML under ``model.init_args.student``.

    arch: a timm model name (or ``package.module.Class``); its head is sized to the union of all classes.
    taps: one per common-feature block (default ["pooled"]), matched position by position with every
      teacher's taps;
      an empty list, with every teacher's ``taps: []`` too, trains with soft targets only (plain
      multi-teacher KD).
    input_size, mean, std, model_kwargs: as for a teacher.
    """

    arch: str
    taps: NotRequired[list[Tap]]
    input_size: NotRequired[int | None]
    mean: NotRequired[list[float] | None]
    std: NotRequired[list[float] | None]
    model_kwargs: NotRequired[dict[str, Any]]


class AmalgamationModule(L.LightningModule):
    """Common Feature Learning (Luo et al., IJCAI 2019) with the paper's choices exposed as arguments.

    Args:
        teachers: the frozen experts (see ``TeacherConfig``); teacher i owns slice i of the union head.
        student: the student (see ``StudentConfig``).
        block_width: channels of the common feature space.
        block_depth: residual blocks in the shared extractor (feature-map blocks).
        kd: ``"concat"`` (paper: softmax over the concatenated teacher logits) or ``"slice"`` (one KL per
            teacher on its own slice; better task-agnostic accuracy).
        temperature: soft-target temperature (paper: 1).
        kd_task_weighting: in ``kd: slice``, how much each teacher's soft-target term is weighted per image by
            the student's own belief that the image is of that teacher's task (its union softmax summed over
            the slice, detached, divided by the batch mean so that each teacher keeps its total weight).
            0 = every teacher on every image (off); 1 = fully weighted: a teacher's opinion of images outside
            its task then shapes the student less.
        loss_weights: weights of ``kd``, ``mmd`` and ``recon`` (paper: 1, 10, 10), and of the union-prior
            terms ``balance`` and ``entropy`` (``losses.UnionPrior``; 0 = off, the paper's method), and of
            ``selflabel`` (``losses.SelfLabel``: the student's confident union prediction trains a strongly
            augmented view; one more student pass per step; 0 = off), of ``contrast``
            (``losses.ViewContrast`` on the student's last tap, through a small projector: the strongly
            augmented view of each image must pick its plain view out of the batch; shares self-labelling's
            extra pass; 0 = off), and of ``neighbour``
            (``losses.NeighbourConsistency``: images close in the teachers' joint features get the same union
            class; 0 = off), and of ``task_gate`` (``losses.TaskGate``: for every teacher with BatchNorm
            layers, a gate fitted to its running statistics says which images are of its task, and the
            student's mass on that teacher's slice is pulled toward it (see ``task_gate_target``); 0 = off).
        mmd_bandwidths: Gaussian kernel sigmas (paper: 0.001 ... 2).
        optimizer: optimizer class (``class_path`` in YAML; default Adam); it gets parameter groups carrying
            their own ``lr`` and ``weight_decay``, so set those here rather than in its init_args.
        lr: learning rate of the student backbone.
        head_lr: learning rate of the student head (default: ``lr``; the paper used 10x for a
            pretrained backbone).
        block_lr: learning rate of the common-feature blocks (default: ``lr``).
        weight_decay: applied to every group (paper: 1e-4).
        scheduler: ``"cosine"`` (per step, to zero), ``"step"`` (x ``step_gamma`` every ``step_epochs``,
            the paper's StepLR(15, 0.1)) or ``"none"``.
        warmup_steps: linear warm-up before the cosine.
        compile: ``torch.compile`` the student, blocks and teachers (in place, state-dict keys unchanged).
            Raises ``torch._dynamo.config.recompile_limit`` to four per network, since all networks share one
            forward's code and dynamo counts recompiles per code object.
        compile_mode: ``torch.compile``'s mode for those networks: ``"reduce-overhead"`` replays each one's
            kernels as CUDA graphs, for small images whose steps are bound by kernel launches, not arithmetic.
        channels_last: run convolutions in channels-last memory format (faster on GPUs; on CPU the 28 px
            demo's step was 1.15x faster, benchmarks/RESULTS.md).
        evaluate_teachers: also report each teacher's accuracy and their concatenated union accuracy.
        nan_check_every_n_steps: stop with a clear error when a loss term is NaN/Inf; each check syncs
            with the device, so GPU runs may check less often.
        teacher_dtype: the frozen teachers' weights and forward in this dtype; their features and logits come
            back in float32. ``bfloat16`` halves the teachers' memory and weight traffic on GPUs (no
            autocast casts per step); CPUs without bf16 units run it slower than float32.
        teacher_cache: keep the teachers' outputs for each training view seen (``amalgam.teacher_cache``), so
            a view met again skips the teachers. ``True`` sizes it to the training set; an int caps the
            views kept. Pays off without random augmentation (data ``padding: 0``, ``flip: false``): epochs
            after the first then run no teacher at all.
        selflabel_threshold: confidence a pseudo-label needs to count in the ``selflabel`` term.
        selflabel_target: what the ``selflabel`` term labels: ``"class"`` (the union class) or ``"task"`` (only
            which teacher's slice the image belongs to; the soft targets keep the distribution inside it).
        task_gate_target: what the ``task_gate`` term pulls the student toward: ``"gate"`` (each gated
            teacher's slice mass toward its gate, binary cross-entropy) or ``"product"`` (the student's task
            distribution times every gate's odds against its prior, renormalised: ``losses.gated_task_loss``;
            a gate that tells nothing leaves the student alone).
        teacher_flip_average: the teachers see each training view and its mirror image, and their logits and
            features are averaged (feature maps flipped back first): a two-view teacher ensemble gives the
            student cleaner targets. Only for images whose label survives a horizontal flip (not text or
            digits). The teachers run once on the doubled batch.
        mixup_alpha: above 0, every training image is blended with another image of its batch
            (``amalgam.data.augment.mix_images``, blend weight ~ Beta(alpha, alpha) per image), and teachers and
            student all see the blend: the teachers then label points between images ("function matching").
            Blends never repeat, so a teacher cache only misses.
        shared_strong_view: teachers and student see a strongly augmented view (``strong_view``: shift, flip,
            cut-out) of every training image, drawn on top of the data module's view: consistent strong
            augmentation, the other half of "function matching".
        union_teacher: a student trained earlier on the same tasks and classes, as written by ``python -m amalgam
            export``. With loss weight ``union_kd`` this student also imitates its softmax over the whole union
            at ``temperature`` ("born-again" self-distillation): the earlier student's choice between tasks,
            which no teacher gives, becomes a soft target.
        contrast_temperature: temperature of the ``contrast`` term's cosine similarities.
        contrast_dim: output width of the ``contrast`` term's projector (two linear layers).
        neighbour_bank_size: recent training images the ``neighbour`` term searches for neighbours.
        neighbour_k: neighbours per image in the ``neighbour`` term.
    """

    # Loss terms a subclass adds in ``loss_terms``, with their default weights: they are then set under
    # ``model.loss_weights`` and weighed by ``combine_losses`` like the built-in ones.
    extra_loss_terms: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        teachers: list[TeacherConfig],
        student: StudentConfig,
        block_width: int = 128,
        block_depth: int = 2,
        kd: Literal["concat", "slice"] = "concat",
        temperature: float = 1.0,
        kd_task_weighting: float = 0.0,
        loss_weights: dict[str, float] | None = None,
        mmd_bandwidths: list[float] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        block_lr: float | None = None,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "step", "none"] = "cosine",
        warmup_steps: int = 0,
        step_epochs: int = 15,
        step_gamma: float = 0.1,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        channels_last: bool = False,
        evaluate_teachers: bool = True,
        nan_check_every_n_steps: int = 1,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        teacher_cache: bool | int = False,
        selflabel_threshold: float = 0.95,
        selflabel_target: Literal["class", "task"] = "class",
        task_gate_target: Literal["gate", "product"] = "gate",
        teacher_flip_average: bool = False,
        mixup_alpha: float = 0.0,
        shared_strong_view: bool = False,
        union_teacher: str | None = None,
        contrast_temperature: float = 0.2,
        contrast_dim: int = 64,
        neighbour_bank_size: int = 4096,
        neighbour_k: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Every argument as this class received it (see init_args). Under LightningCLI the hparams hold the
        # config's arguments only (what reloading the class needs), not values a subclass fixed in its own
        # super().__init__ call.
        self._received_args = {name: value for name, value in locals().items() if name in INIT_ARGS}
        self._hparams_at_init = dict(self.hparams)  # shallow: what init_args compares against, cheaply
        self.optimizer_factory = optimizer or fused_adam
        if not teachers:
            raise ValueError("model.teachers is empty: give at least one teacher")
        tasks = [t["task"] for t in teachers]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"teacher task names must be unique, got {tasks}")
        # Checked here: a negative rate or weight would train silently in the wrong direction, and a block
        # width of 0 fail deep inside the first step.
        for key, value in {"lr": lr, "head_lr": head_lr, "block_lr": block_lr, "weight_decay": weight_decay}.items():
            if value is not None and not value >= 0:
                raise ValueError(f"model.{key} must be >= 0, got {value}")
        if block_width < 1 or block_depth < 0:
            raise ValueError(f"model.block_width must be >= 1 and model.block_depth >= 0, got {block_width} and "
                             f"{block_depth}")
        names = Counter(name for t in teachers for name in set(t.get("classes") or []))
        shared = sorted(name for name, count in names.items() if count > 1)
        if shared:
            rank_zero_warn(f"more than one teacher has classes named {shared}: each stays a class of its own in the "
                           f"union (one logit per teacher's class), told apart by the task only")

        # Teachers live outside the module tree: no optimizer, no DDP sync, no checkpoint entries.
        self._teachers = [Teacher.from_config(cfg) for cfg in teachers]
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"model.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {teacher_dtype!r}")
        for teacher in self._teachers:
            teacher.to(TEACHER_DTYPES[teacher_dtype])
        self.task_names = tasks
        self.slices: list[tuple[int, int]] = []
        for t in self._teachers:
            start = self.slices[-1][1] if self.slices else 0
            self.slices.append((start, start + len(t.classes)))
        self.num_classes = self.slices[-1][1]

        unknown = set(student) - set(StudentConfig.__annotations__)
        if unknown:
            raise ValueError(f"model.student has unknown keys {sorted(unknown)}; "
                             f"valid keys: {sorted(StudentConfig.__annotations__)}")
        self.student = TappedNetwork(student["arch"], self.num_classes, student.get("taps", ["pooled"]),
                                     student.get("input_size"), student.get("mean"), student.get("std"),
                                     student.get("model_kwargs"), owner=f"student ({student['arch']})")
        defaults = {**DEFAULT_WEIGHTS, **self.extra_loss_terms}
        weights = {**defaults, **(loss_weights or {})}
        if set(weights) - set(defaults):
            raise ValueError(f"model.loss_weights has unknown terms {sorted(set(weights) - set(defaults))};"
                             f" valid terms: {sorted(defaults)} (a subclass adds its own in extra_loss_terms)")
        negative = {k: v for k, v in weights.items() if not v >= 0}
        if negative:
            raise ValueError(f"model.loss_weights must be >= 0 (0 turns a term off), got {negative}")
        self.loss_weights = weights
        # With both common-space terms off (plain KD) the blocks would only cost time: build none.
        uses_blocks = weights["mmd"] > 0 or weights["recon"] > 0
        self.blocks = self._build_blocks(block_width, block_depth) if uses_blocks else nn.ModuleList()
        self.kd_loss = config_value("kd/temperature", lambda: SoftTargetKD(kd, temperature))
        if not 0.0 <= kd_task_weighting <= 1.0:
            raise ValueError(f"model.kd_task_weighting must be in [0, 1], got {kd_task_weighting}")
        if kd_task_weighting and kd != "slice":
            raise ValueError("model.kd_task_weighting weighs each teacher's term separately: it needs kd: slice")
        self.mmd_loss = config_value("mmd_bandwidths", lambda: MultiBandwidthMMD(
            PAPER_BANDWIDTHS if mmd_bandwidths is None else mmd_bandwidths))
        self.recon_loss = ReconstructionLoss()
        self.union_prior = UnionPrior()
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if mixup_alpha < 0:
            raise ValueError(f"model.mixup_alpha must be >= 0 (0 turns mixup off), got {mixup_alpha}")
        if selflabel_target not in ("class", "task"):
            raise ValueError(f"model.selflabel_target must be 'class' or 'task', got {selflabel_target!r}")
        if task_gate_target not in ("gate", "product"):
            raise ValueError(f"model.task_gate_target must be 'gate' or 'product', got {task_gate_target!r}")
        # Its running mean prediction is saved only when the term is on, so that other checkpoints keep their keys.
        self.self_label = config_value("selflabel_threshold", lambda: SelfLabel(
            selflabel_threshold, num_classes=self.num_classes if weights["selflabel"] else None))
        self.view_contrast = config_value("contrast_temperature", lambda: ViewContrast(contrast_temperature))
        # Built only when used, so that checkpoints without the term keep their keys.
        self.projector = self._build_projector(contrast_dim) if weights["contrast"] else None
        # Like the teachers, frozen and outside the module tree (a list, so that nn.Module does not register it).
        self._union_teacher = [self._load_union_teacher(union_teacher)] if union_teacher else []
        if weights["union_kd"] and not self._union_teacher:
            raise ValueError("loss_weights.union_kd imitates an earlier student's union predictions: set "
                             "model.union_teacher to a directory written by `python -m amalgam export`")
        self.union_kd_loss = SoftTargetKD("concat", temperature)
        self._skipped_steps = (-1, 0)  # (epoch, its training steps with < 2 images)
        # Built only when used: its bank is checkpointed state.
        untapped = [t.task for t in self._teachers if not t.net.tapper.taps]
        if weights["neighbour"] and untapped:
            raise ValueError(f"loss_weights.neighbour looks for neighbours in the teachers' features, but teachers "
                             f"{untapped} have no taps: give each at least one (e.g. taps: [pooled])")
        self.neighbour_loss = config_value("neighbour_bank_size/neighbour_k", lambda: NeighbourConsistency(
            neighbour_bank_size, neighbour_k)) if weights["neighbour"] else None
        # Built only when used; the hooks read each BatchNorm teacher's layer inputs during the teachers' pass.
        self._moments: dict[str, list[Tensor]] = {}
        self.task_gates = self._build_task_gates() if weights["task_gate"] else None
        self._build_metrics()
        self._teacher_cache: TeacherCache | None = None

    @property
    def teachers(self) -> list[Teacher]:
        return self._teachers

    @property
    def classes_per_task(self) -> dict[str, list[str]]:
        """Each task's class names, in head order (what ``callbacks.PredictionWriter`` names predictions by)."""
        return {t.task: list(t.classes) for t in self._teachers}

    def _load_union_teacher(self, directory: str) -> Student:
        union_teacher = load_student(directory)
        expected = [(t.task, name) for t in self._teachers for name in t.classes]
        if union_teacher.union != expected:
            raise ValueError(f"model.union_teacher {directory} predicts (task, class) {union_teacher.union}, but "
                             f"the teachers' union is {expected}: give a student of the same tasks and classes, "
                             f"in the same order")
        return union_teacher.requires_grad_(False)

    def _build_task_gates(self) -> nn.ModuleDict:
        if self.init_args.teacher_cache:
            raise ValueError("loss_weights.task_gate reads the teachers' BatchNorm inputs on every step, but "
                             "model.teacher_cache skips the teachers on repeated views: turn one of them off")
        gates = {}
        for teacher, (start, stop) in zip(self._teachers, self.slices):
            layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]
            if not layers:
                continue
            store = self._moments[teacher.task] = []
            for layer in layers:
                layer.register_forward_pre_hook(
                    lambda layer, inputs, store=store: store.append(batchnorm_moments(inputs[0], layer))
                    if self.training else None)
            gates[teacher.task] = TaskGate(2 * sum(m.num_features for m in layers),
                                           prior=(stop - start) / self.num_classes)
        if not gates:
            raise ValueError(f"loss_weights.task_gate reads BatchNorm running statistics, but none of the teachers "
                             f"{self.task_names} has BatchNorm layers (LayerNorm networks such as ViT and ConvNeXt "
                             f"keep none): set it to 0")
        rank_zero_info(f"task gate: teachers {sorted(gates)} (the others have no BatchNorm)")
        return nn.ModuleDict(gates)

    def _build_projector(self, out_dim: int) -> nn.Sequential:
        shapes = self.student.tap_shapes()
        if not shapes:
            raise ValueError("loss_weights.contrast compares the student's features at its last tap, but the "
                             "student has no taps: give it one (e.g. student.taps: [pooled])")
        width = shapes[-1][0]
        return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, out_dim))

    def _build_blocks(self, width: int, depth: int) -> nn.ModuleList:
        student_shapes = self.student.tap_shapes()
        teacher_shapes = []
        for t in self._teachers:
            if len(t.net.tapper.taps) != len(student_shapes):
                raise ValueError(
                    f"teacher {t.task!r} has taps {t.net.tapper.taps} but the student has "
                    f"{self.student.tapper.taps}: give every network one tap per common-feature block")
            teacher_shapes.append(t.net.tap_shapes())
        return nn.ModuleList(
            CommonFeatureBlock(s, [shapes[k] for shapes in teacher_shapes], width, depth, self.task_names)
            for k, s in enumerate(student_shapes))

    def _build_metrics(self) -> None:
        acc = {f"{task}_acc": MulticlassAccuracy(b - a, average="micro")
               for task, (a, b) in zip(self.task_names, self.slices)}
        acc |= {f"{task}_agreement": MulticlassAccuracy(b - a, average="micro")
                for task, (a, b) in zip(self.task_names, self.slices)}
        acc |= {f"{task}_teacher_acc": MulticlassAccuracy(b - a, average="micro")
                for task, (a, b) in zip(self.task_names, self.slices)}
        acc["union_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
        acc["teachers_concat_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
        self.metrics = nn.ModuleDict(acc)
        # Task-agnostic counts over the union classes (rows: true class), kept per stage in ``self.confusion``
        # after each evaluation for pictures (``amalgam.visualize.confusion_plot``): which teacher's classes the
        # student mixes up when the task is unknown.
        self.union_confusion = MulticlassConfusionMatrix(self.num_classes)
        self.confusion: dict[str, Tensor] = {}

    # Teachers are not submodules, so device and dtype moves must reach them explicitly.
    def _apply(self, fn: Any, recurse: bool = True) -> AmalgamationModule:
        super()._apply(fn, recurse)
        for teacher in getattr(self, "_teachers", []):
            teacher._apply(fn, recurse)
        for union_teacher in getattr(self, "_union_teacher", []):
            union_teacher._apply(fn, recurse)
        return self

    def configure_model(self) -> None:
        if self.init_args.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.init_args.compile:
            # Every network runs TappedNetwork.forward, and dynamo counts recompiles per code object, not per
            # network: each network in each grad mode takes an entry. Three teachers and the student filled
            # the default limit (8); a fourth teacher would have run eagerly.
            networks = 1 + len(self._teachers)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * networks)
            mode = self.init_args.compile_mode
            self.student.compile(mode=mode)
            self.blocks.compile(mode=mode)
            for teacher in self._teachers:
                teacher.net.compile(mode=mode)

    def forward(self, images: Tensor) -> Tensor:
        """Union logits of the student for float [0,1] images."""
        return self.student(images).logits

    # ----------------------------------------------------------------------------------------------------
    # The training step, in overridable hooks

    def teacher_outputs(self, images: Tensor) -> list[Features]:
        def run(x: Tensor) -> list[Features]:
            for store in self._moments.values():
                store.clear()
            if self.init_args.teacher_flip_average:
                return [mirror_average(teacher(torch.cat([x, x.flip(-1)]))) for teacher in self._teachers]
            return [teacher(x) for teacher in self._teachers]

        if not (self.init_args.teacher_cache and self.training):
            return run(images)
        cache = self._teacher_cache
        first = cache is None
        if first:
            cache = self._teacher_cache = self._make_teacher_cache()
        outputs = cache(images, run)
        if first and self._trainer is not None:  # its size is known once it holds a first batch
            rank_zero_info(f"teacher cache: up to {cache.capacity} views, {cache.nbytes() / 2 ** 20:.0f} MiB")
        return outputs

    def _make_teacher_cache(self) -> TeacherCache:
        setting = self.init_args.teacher_cache
        if setting is True:
            loader = self.trainer.train_dataloader if self._trainer else None
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError("model.teacher_cache: true needs a training set of known length to size the "
                                 "cache; give the number of views to keep instead (e.g. teacher_cache: 60000)")
            setting = len(dataset)
        datamodule = self.trainer.datamodule if self._trainer else None
        random_views = [name for name, on in [("model.mixup_alpha", self.init_args.mixup_alpha),
                                              ("model.shared_strong_view", self.init_args.shared_strong_view),
                                              ("data padding", getattr(datamodule, "padding", 0)),
                                              ("data flip", getattr(datamodule, "flip", False))] if on]
        if random_views:
            rank_zero_warn(f"model.teacher_cache is on but the teachers see views drawn at random ({', '.join(random_views)}):"
                           f" they rarely repeat, so the cache will mostly miss and hold views never read again. "
                           f"Turn those off (data padding: 0, flip: false) to let it skip the teachers after the "
                           f"first epoch, or the cache off.")
        return TeacherCache(int(setting))

    def student_outputs(self, images: Tensor) -> Features:
        return self.student(images)

    def common_features(self, student: Features, teachers: list[Features]) -> list[CommonFeatures]:
        return [block(student.taps[k], [t.taps[k] for t in teachers]) for k, block in enumerate(self.blocks)]

    def loss_terms(self, student: Features, teachers: list[Features], common: list[CommonFeatures]
                   ) -> dict[str, Tensor]:
        weights = self.kd_task_weights(student.logits) if self.init_args.kd_task_weighting else None
        terms = {"kd": self.kd_loss(student.logits, [t.logits for t in teachers], self.slices, weights)}
        if common:
            terms["mmd"] = sum(self.mmd_loss(c.student, c.teachers) for c in common)
            terms["recon"] = sum(self.recon_loss(c.reconstructions, c.targets) for c in common)
        if self.loss_weights["balance"] or self.loss_weights["entropy"]:
            terms |= self.union_prior(student.logits)
        if self.neighbour_loss is not None:
            terms["neighbour"] = self.neighbour_loss(self.neighbour_keys(teachers), student.logits)
        if self.task_gates is not None:
            terms |= self.task_gate_terms(student.logits)
        return terms

    def task_gate_terms(self, student_logits: Tensor) -> dict[str, Tensor]:
        """``losses.TaskGate`` for every BatchNorm teacher, summed, on the moments its hooks read this step;
        with ``task_gate_target="product"`` one ``losses.gated_task_loss`` over all tasks instead."""
        log_probs = student_logits.float().log_softmax(1)
        log_task = torch.stack([log_probs[:, a:b].logsumexp(1) for a, b in self.slices], 1)
        product = self.init_args.task_gate_target == "product"
        log_odds = torch.zeros_like(log_task)
        terms: dict[str, Tensor] = {}
        for index, task in enumerate(self.task_names):
            if task not in self.task_gates:
                continue
            # Read under the teachers' inference mode: a copy may enter autograd. A mirrored second half
            # (teacher_flip_average) is averaged into the first, like the teachers' outputs.
            moments = torch.cat(self._moments[task], 1).clone()
            if len(moments) == 2 * len(log_task):
                moments = sum(moments.chunk(2)) / 2
            if product:
                fit, g = self.task_gates[task].fit(moments)
                log_odds[:, index] = self.task_gates[task].log_odds(g)
                pairs = {"task_gate_fit": fit}
            else:
                rest = torch.cat([log_task[:, :index], log_task[:, index + 1:]], 1).logsumexp(1)
                pairs = self.task_gates[task](moments, log_task[:, index] - rest)
            for name, value in pairs.items():
                terms[name] = terms[name] + value if name in terms else value
        if product:
            terms["task_gate"] = gated_task_loss(log_task, log_odds)
        return terms

    @torch.no_grad()
    def kd_task_weights(self, student_logits: Tensor) -> Tensor:
        """[B, teachers] weights of the per-slice soft-target terms (see ``kd_task_weighting``)."""
        belief = slice_mass(F.softmax(student_logits.detach().float(), dim=1), self.slices)
        alpha = self.init_args.kd_task_weighting
        # Relative to the mean belief over the whole batch: under DDP every process's (losses.batch_mean).
        return (1 - alpha) + alpha * belief / batch_mean(belief).unsqueeze(0).clamp_min(1e-6)

    def neighbour_keys(self, teachers: list[Features]) -> Tensor:
        """Where the ``neighbour`` term looks for neighbours: each teacher's last tap (feature maps averaged
        over positions), L2-normalised so that every teacher counts the same, side by side."""
        def pooled(t: Tensor) -> Tensor:
            return t.float().flatten(2).mean(2) if t.ndim > 2 else t.float()

        return torch.cat([F.normalize(pooled(t.taps[-1]), dim=1) for t in teachers], 1)

    def strong_outputs(self, images: Tensor) -> Features:
        """The student on a strongly augmented view (``strong_view``) of the training batch: one extra pass that
        the ``selflabel`` and ``contrast`` terms share."""
        return self.student_outputs(strong_view(images))

    def self_label_term(self, student: Features, strong: Features) -> Tensor:
        slices = self.slices if self.init_args.selflabel_target == "task" else None
        loss, kept = self.self_label(student.logits, strong.logits, slices)
        self.log("train/selflabel_kept", kept, on_step=False, on_epoch=True)
        return loss

    def contrast_term(self, student: Features, strong: Features) -> Tensor:
        def projected(out: Features) -> Tensor:
            last = out.taps[-1]
            return self.projector(last.flatten(2).mean(2) if last.ndim > 2 else last)

        return self.view_contrast(projected(student), projected(strong))

    def union_kd_term(self, images: Tensor, student: Features) -> Tensor:
        with torch.no_grad():
            target = self._union_teacher[0](images)
        return self.union_kd_loss(student.logits, [target], [(0, self.num_classes)])

    def combine_losses(self, terms: dict[str, Tensor]) -> Tensor:
        unknown = set(terms) - set(self.loss_weights) - UNWEIGHTED
        if unknown:
            raise ValueError(f"loss term(s) {sorted(unknown)} have no weight: declare them in "
                             f"{type(self).__name__}.extra_loss_terms (name: default weight), then set them "
                             f"under model.loss_weights like any other")
        return sum((1.0 if name in UNWEIGHTED else self.loss_weights[name]) * value for name, value in terms.items())

    @property
    def init_args(self) -> AttributeDict:
        """Every ``__init__`` argument, as received or as changed since in ``hparams`` (Lightning's learning-rate
        finder writes ``hparams.lr``); what the module reads its settings from. Only a change counts: a
        subclass's own argument of the same name (a preset key it turns into ``student``) is not the base's."""
        initial = self._hparams_at_init  # not hparams_initial: a deep copy on every read, and this is read per step
        changed = {k: v for k, v in self.hparams.items() if k in self._received_args
                   and (k not in initial or (v is not initial[k] and _differs(v, initial[k])))}
        return AttributeDict({**self._received_args, **changed})

    def on_train_epoch_end(self) -> None:
        # An epoch of skipped steps (a folder with one readable image, say) must not pass for training.
        epoch, skipped = self._skipped_steps
        if epoch == self.current_epoch and skipped == self.trainer.num_training_batches:
            raise ValueError(f"no training step ran in epoch {self.current_epoch}: each of its "
                             f"{skipped} batch(es) had fewer than 2 readable images. Add images to "
                             f"the training folder or fix the unreadable ones (logged as data/skipped).")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # A training batch's crop/flip and dropout draw from a seed fixed by (seed, epoch, batch): a run
        # resumed mid-epoch replays them exactly (amalgam.checkpointing, amalgam.callbacks.ExactResume).
        if self._trainer is not None and self.trainer.training:
            seed_training_batch(self.trainer)
        return batch

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor | None:
        datamodule = self.trainer.datamodule if self._trainer else None
        if hasattr(datamodule, "skipped_total"):  # unreadable image files dropped so far
            self.log("data/skipped", float(datamodule.skipped_total), on_step=True, on_epoch=False)
        too_few = images.shape[0] < 2  # unreadable files left < 2 images; BatchNorm and MMD need 2
        ddp = self._trainer is not None and self.trainer.world_size > 1
        if ddp and hasattr(datamodule, "skipped_total"):
            # Every process skips together: the others would wait for this one in the step's all-reduces
            # (the union prior's batch mean, the gradients). Only folders of files can lose images.
            too_few = self.trainer.strategy.reduce_boolean_decision(too_few, all=False)
        if too_few:
            epoch, skipped = self._skipped_steps
            self._skipped_steps = (self.current_epoch, skipped + 1 if epoch == self.current_epoch else 1)
            if not ddp:
                return None
            # DDP's gradient all-reduce still runs: a zero loss through every trainable parameter joins it.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        if self.init_args.shared_strong_view:
            images = strong_view(images)
        if self.init_args.mixup_alpha:
            images = mix_images(images, self.init_args.mixup_alpha)
        if self.init_args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teachers = self.teacher_outputs(images)
        student = self.student_outputs(images)
        terms = self.loss_terms(student, teachers, self.common_features(student, teachers))
        if self.loss_weights["selflabel"] or self.loss_weights["contrast"]:
            strong = self.strong_outputs(images)
            if self.loss_weights["selflabel"]:
                terms["selflabel"] = self.self_label_term(student, strong)
            if self.loss_weights["contrast"]:
                terms["contrast"] = self.contrast_term(student, strong)
        if self.loss_weights["union_kd"]:
            terms["union_kd"] = self.union_kd_term(images, student)
        loss = self.combine_losses(terms)
        self._check_finite(terms, loss)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        if self._teacher_cache is not None:
            self.log("train/teacher_cache_hits", self._teacher_cache.last_hit_rate, on_step=False, on_epoch=True)
        return loss

    def _check_finite(self, terms: dict[str, Tensor], loss: Tensor) -> None:
        every = self.init_args.nan_check_every_n_steps
        if every <= 0 or self.global_step % every:
            return
        finite = here = bool(torch.isfinite(loss.detach()))
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank stops together: one rank stopping alone leaves the others waiting in an all-reduce.
            finite = self.trainer.strategy.reduce_boolean_decision(here, all=True)
        if not finite:
            bad = ([name for name, value in terms.items() if not torch.isfinite(value.detach())]
                   if not here else ["(on another process)"])
            raise FloatingPointError(
                f"loss term(s) {bad or ['total']} became NaN/Inf at step {self.global_step} "
                f"(epoch {self.current_epoch}). Checkpoints written so far are intact; lower the learning "
                f"rate or the loss weights, then resume with --ckpt_path last.")

    # ----------------------------------------------------------------------------------------------------
    # Evaluation: task-aware (argmax inside the task's slice), task-agnostic (argmax over the union)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and isinstance(getattr(datamodule, "batch_size", None), int) and datamodule.batch_size < 2:
            # Every step would be skipped (see training_step): the run would end with the student untouched.
            raise ValueError(f"data.batch_size is {datamodule.batch_size}: amalgamation needs at least 2 images "
                             f"per step (the union prior, BatchNorm and MMD average over the batch); set it >= 2.")
        batch = getattr(datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch, int) and self.loss_weights["balance"]:
            images = batch * self.trainer.world_size  # balance's batch mean spans every process (batch_mean)
            if images < self.num_classes:
                rank_zero_warn(f"loss_weights.balance asks the mean prediction over {images} images per step to be "
                               f"uniform over {self.num_classes} classes: with fewer images than classes only "
                               f"unsure predictions meet it, and it works against confident ones (entropy). Use "
                               f"batches of at least {self.num_classes} images (over all processes), or a lower "
                               f"balance weight.")
        self.eval_tasks = list(self.task_names)
        task_classes = getattr(datamodule, "task_classes", None)
        if stage in ("validate", "test") and task_classes is not None and not task_classes:
            what = "validate" if stage == "validate" else "test"
            raise ValueError(f"nothing to {what}: the data has no labelled images (data.init_args.eval_dirs is "
                             f"empty). Give one folder per task with a sub-folder per class: eval_dirs: "
                             f"{{{self.task_names[0]}: path/to/folder, ...}}")
        if not task_classes:
            return
        expected = {t.task: t.classes for t in self._teachers}
        if hasattr(datamodule, "check_task_classes"):
            datamodule.check_task_classes(expected)
        for task, classes in task_classes.items():
            if task not in expected:
                raise ValueError(f"evaluation task {task!r} has no teacher; teacher tasks: {self.task_names}")
            if list(classes) != list(expected[task]):
                raise ValueError(f"evaluation classes of task {task!r} {list(classes)} differ from the "
                                 f"teacher's {expected[task]}")
        self.eval_tasks = list(task_classes)

    def _eval_step(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> None:
        images, labels = batch
        if not len(images):  # every file of the batch was unreadable (see data/skipped): nothing to score
            return
        task = self.eval_tasks[dataloader_idx]
        t = self.task_names.index(task)
        a, b = self.slices[t]
        logits = self(images)
        m = self.metrics
        m[f"{task}_acc"].update(logits[:, a:b], labels)
        m["union_acc"].update(logits, labels + a)
        self.union_confusion.update(logits, labels + a)
        if self.init_args.evaluate_teachers:
            teacher_logits = [teacher(images).logits for teacher in self._teachers]
            m[f"{task}_teacher_acc"].update(teacher_logits[t], labels)
            m[f"{task}_agreement"].update(logits[:, a:b], teacher_logits[t].argmax(1))
            m["teachers_concat_acc"].update(torch.cat(teacher_logits, 1), labels + a)

    def _log_eval(self, prefix: str) -> None:
        names = {"union_acc": f"{prefix}/acc_union", "teachers_concat_acc": f"{prefix}/teachers_concat/acc_union"}
        for task in self.task_names:
            names |= {f"{task}_acc": f"{prefix}/{task}/acc", f"{task}_agreement": f"{prefix}/{task}/agreement",
                      f"{task}_teacher_acc": f"{prefix}/teacher/{task}/acc"}
        for key, metric in self.metrics.items():
            if self._on_any_rank(metric.update_count > 0):
                self.log(names[key], metric.compute(), prog_bar=key == "union_acc")
            metric.reset()
        if self._on_any_rank(self.union_confusion.update_count > 0):
            self.confusion[prefix] = self.union_confusion.compute().cpu()
        self.union_confusion.reset()

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` on this process or another: a metric's compute() gathers from every process, so all of them
        call it if any has data (a process whose images were all unreadable has none)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    @property
    def union_classes(self) -> list[tuple[str, str]]:
        """(task, class name) of every union logit, in head order."""
        return [(t.task, name) for t in self._teachers for name in t.classes]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images, indices = batch if isinstance(batch, (tuple, list)) else (batch, None)
        logits = self(images)
        probs = {f"probs/{task}": logits[:, a:b].softmax(1) for task, (a, b) in zip(self.task_names, self.slices)}
        return {"indices": indices, "union_top": logits.argmax(1), **probs}

    # ----------------------------------------------------------------------------------------------------
    # Optimisation: separate groups for the student backbone, its head, and the common-feature blocks

    def parameter_groups(self) -> list[dict[str, Any]]:
        hp = self.init_args
        classifier = classifier_of(self.student.model)
        head = set(classifier.parameters()) if classifier is not None else set()
        backbone = [p for p in self.student.parameters() if p not in head]
        groups = [{"name": "student", "params": backbone, "lr": hp.lr},
                  {"name": "head", "params": list(head), "lr": hp.head_lr or hp.lr},
                  {"name": "blocks", "params": list(self.blocks.parameters()), "lr": hp.block_lr or hp.lr}]
        if self.projector is not None:
            groups.append({"name": "projector", "params": list(self.projector.parameters()), "lr": hp.lr})
        if self.task_gates is not None:  # a linear fit of fixed teacher statistics: faster than the student
            groups.append({"name": "task_gate", "params": list(self.task_gates.parameters()), "lr": 10 * hp.lr})
        # Whatever else trains (modules a subclass adds): at the student's rate, never silently left out.
        grouped = {id(p) for g in groups for p in g["params"]}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in grouped]
        groups.append({"name": "other", "params": others, "lr": hp.lr})
        return [dict(g, weight_decay=hp.weight_decay) for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        hp = self.init_args
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, hp.step_epochs, hp.step_gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = finite_steps(self.trainer, "model.scheduler: cosine decays to zero at the end of the run")
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": warmup_cosine(optimizer, hp.warmup_steps, total), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A Python callable (optimizer given in code, not YAML) would make the checkpoint need pickle.
        hparams = checkpoint.get("hyper_parameters", {})
        if callable(hparams.get("optimizer")):
            hparams["optimizer"] = None
        # The networks as built, for export: a subclass may build its student or teachers itself, so the
        # hyper-parameters alone need not name them.
        args = self.init_args
        checkpoint["amalgam"] = {"student": dict(args.student), "teachers": [dict(t) for t in args.teachers]}
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(getattr(datamodule, "image_size", None), int):  # the size image files were read at
            checkpoint["amalgam"]["image_size"] = datamodule.image_size
        # Never replace a good checkpoint with broken weights: raising here aborts this save before any file
        # is touched (and the run with it), so the last good checkpoint stays the one to resume from.
        broken = [k for k, v in checkpoint.get("state_dict", {}).items()
                  if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise FloatingPointError(
                f"weights {broken[:5]} became NaN/Inf by step {self.global_step} (epoch {self.current_epoch}); "
                f"this checkpoint was not written and earlier ones are intact. Lower the learning rate or the "
                f"loss weights, then resume with --ckpt_path last.")


INIT_ARGS = tuple(inspect.signature(AmalgamationModule.__init__).parameters)[1:]


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # values that do not compare (tensors of other shapes): treat as changed
        return a is not b


def finite_steps(trainer: L.Trainer, why: str) -> int:
    """The run's optimizer steps, for a schedule that needs its length; a clear error for an endless run."""
    steps = trainer.estimated_stepping_batches
    if steps == float("inf"):
        raise ValueError(f"{why}, but the run has no end (trainer.max_epochs -1 without max_steps): set "
                         f"trainer.max_epochs or trainer.max_steps")
    return max(1, int(steps))


def config_value(key: str, build: Callable[[], Any]) -> Any:
    """``build()``, its ValueError prefixed with the config key that caused it."""
    try:
        return build()
    except ValueError as err:
        raise ValueError(f"model.{key}: {err}") from err


def mirror_average(out: Features) -> Features:
    """Outputs for a batch ``[x; mirror(x)]`` -> per image, the mean of both views. Maps of the mirrored view are
    flipped back so that positions line up; logits and pooled vectors have no positions."""
    def mean(t: Tensor) -> Tensor:
        plain, mirrored = t.chunk(2)
        return (plain + (mirrored.flip(-1) if t.ndim == 4 else mirrored)) / 2

    return Features([mean(t) for t in out.taps], mean(out.logits))


def fused_adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """The default optimizer: Adam, fused into one kernel per parameter where the device allows it (CPU,
    CUDA). The unfused loop runs about ten small ops per tensor; fused, its step took a third of the time
    on CPU for a slim ResNet-18 (benchmarks/RESULTS.md), and on a GPU it saves hundreds of kernel launches."""
    params = [p for group in groups for p in group["params"]]
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(groups, fused=True if fusable else None)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

