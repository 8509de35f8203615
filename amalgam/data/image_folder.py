"""DataModule over the user's own image folders: unlabeled training images, labeled evaluation folders."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from amalgam.callbacks import ExactResume
from amalgam.data.base import AmalgamDataModule, eval_sampler, pin_memory_default
from amalgam.data.image_files import CollateSkipping, ImageFiles, SkipCounted, find_images, scan_images


def folder_name(class_name: str) -> str:
    """The evaluation sub-folder that holds a class: the class name with any '/' (which no folder name can
    hold, as in Fashion-MNIST's 'T-shirt/top') written as '_', compared in Unicode NFC form (macOS writes
    folder names decomposed, YAML files are usually composed)."""
    return unicodedata.normalize("NFC", class_name).replace("/", "_")


def class_folders(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of an evaluation folder: its class names."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"evaluation folder {root} does not exist (or is not a folder); check eval_dirs"
        )
    names = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise ValueError(
            f"evaluation folder {root} has no class sub-folders; put each class's images in {root}/<class>/"
        )
    return names


class ImageFolderDataModule(AmalgamDataModule):
    """Images from folders: train on unlabeled images, evaluate each task on a labeled folder.

    Batches (after `on_after_batch_transfer`, i.e. as the LightningModule sees them):
    train: float images [B, 3, S, S]; validation/test: a list of loaders, one per task in
    `task_names` order, batches `(images, labels)` with label = index into
    `task_classes[task]`; predict: `(images, indices)`, index into `predict_paths`.
    Validation and test use the same `eval_dirs`.

    The loaders themselves yield `SkipCounted(batch, skipped)` of uint8 images; the hook
    unwraps it and adds `skipped` (the bad files dropped from the batch) to `skipped_files`, whose size
    is `skipped_total`: each bad file counts once, however often it is read (on this process, under DDP).

    Args:
        train_dir: Folder of training images, any depth, no labels needed.
        eval_dirs: Task name -> folder with one sub-folder per class (class name = folder name; a '/' in a
            class name is written '_' in its folder name: `folder_name`).
            Call `check_task_classes` with the teachers' class names to label in their order.
        predict_dir: Folder of images to predict on; `train_dir` when None.
        image_size: Side S of the square images: the shorter side is resized to S, then center-cropped.
            Default: the largest input size of the model's networks (student and teachers, so that no
            teacher sees an upsampled image; a Classifier's own), else 224.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and predict; `batch_size` when None.
        num_workers: DataLoader worker processes that read and decode the files.
        padding: Zero-padding, in pixels, before the random training crop (0 = no crop).
        flip: Randomly mirror training images left-right.
        strict: Raise on the first unreadable image file instead of skipping it with a warning.
    """

    def __init__(
        self,
        train_dir: str,
        eval_dirs: dict[str, str] | None = None,
        predict_dir: str | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        padding: int = 0,
        flip: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in {
            "image_size": image_size,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
        }.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if padding < 0 or num_workers < 0:
            raise ValueError(f"padding and num_workers must be >= 0, got {padding} and {num_workers}")
        self.train_dir = Path(train_dir).expanduser()
        if not self.train_dir.is_dir():  # fail now, not after the model is built
            raise FileNotFoundError(
                f"train_dir {self.train_dir} does not exist (or is not a folder); check the path"
            )
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir else self.train_dir
        self.eval_dirs = {task: Path(folder).expanduser() for task, folder in (eval_dirs or {}).items()}
        for task in self.eval_dirs:
            if not isinstance(task, str) or not task.strip():
                raise ValueError(f"eval_dirs keys are task names and must be non-empty, got {task!r}")
        # Folder order until check_task_classes puts each task in its teacher's order.
        self.task_classes = {
            task: [folder_name(name) for name in class_folders(folder)] for task, folder in self.eval_dirs.items()
        }
        self._image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.padding, self.flip, self.strict = padding, flip, strict
        self.skipped_files: set[str] = set()
        self.train_paths: list[Path] | None = None
        self.eval_files: dict[str, list[tuple[Path, str]]] | None = None
        self._predict_paths: list[Path] | None = None

    def check_task_classes(self, expected: dict[str, list[str]]) -> None:
        """Checks each evaluation folder's classes against the teacher's `expected` class names
        (task -> names) and adopts the teacher's order, so labels index the teacher's outputs.

        Raises ValueError naming the task, the folder, and the missing and extra class names.
        Teacher tasks without an evaluation folder are fine: they are just not evaluated.
        """
        for task, folder in self.eval_dirs.items():
            if task not in expected:
                raise ValueError(
                    f"eval_dirs has task {task!r} ({folder}) but the teachers' tasks are {list(expected)}; "
                    f"rename the eval_dirs key"
                )
            found, wanted = set(self.task_classes[task]), {folder_name(name) for name in expected[task]}
            if len(wanted) < len(expected[task]):
                raise ValueError(f"task {task!r}: two of the teacher's classes {expected[task]} would share one "
                                 f"evaluation folder ('/' is written '_'); rename one of them")
            if found != wanted:
                raise ValueError(
                    f"task {task!r}: class folders in {folder} do not match the teacher's classes; "
                    f"missing folders: {sorted(wanted - found)}, extra folders: {sorted(found - wanted)}. "
                    f"Rename the sub-folders to the teacher's class names ('/' written as '_')."
                )
            self.task_classes[task] = list(expected[task])

    @property
    def image_size(self) -> int:
        """The side images are read at: as given, else the largest input size of the model's networks."""
        if self._image_size:
            return self._image_size
        module = self.trainer.lightning_module if self.trainer is not None else None
        # AmalgamationModule: its student and teachers; Classifier: its network.
        nets = [getattr(module, "student", None), getattr(module, "net", None)]
        nets += [getattr(t, "net", None) for t in getattr(module, "teachers", None) or []]
        sizes = [n.input_size for n in nets if isinstance(getattr(n, "input_size", None), int)]
        return max(sizes, default=224)

    @property
    def skipped_total(self) -> int:
        """How many distinct image files could not be read so far."""
        return len(self.skipped_files)

    @property
    def predict_paths(self) -> list[Path]:
        """The images that `predict_dataloader` reads, in order; predict indices point into it."""
        if self._predict_paths is None:
            self._predict_paths = scan_images(self.predict_dir)
        return self._predict_paths

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_paths is None:
            self.train_paths = scan_images(self.train_dir)
        if stage in ("fit", "validate", "test", None) and self.eval_files is None:
            self.eval_files = {task: self._scan_eval_folder(task) for task in self.eval_dirs}
        if stage in ("predict", None):
            self.predict_paths  # noqa: B018 -- scan now, so a bad folder fails in setup

    def _scan_eval_folder(self, task: str) -> list[tuple[Path, str]]:
        # Images directly in the task folder (outside any class folder) have no label and are ignored.
        folder = self.eval_dirs[task]
        files = [(path, folder_name(name)) for name in class_folders(folder) for path in find_images(folder / name)]
        if not files:
            raise ValueError(
                f"evaluation folder {folder} (task {task!r}) has class folders but no images in them"
            )
        return files

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, SkipCounted):
            self.skipped_files.update(batch.skipped)
            batch = batch.batch
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def convert_batch(self, batch: Any, augment: bool) -> Any:
        if isinstance(batch, SkipCounted):  # a loader's batch read outside the trainer, e.g. by a callback
            batch = batch.batch
        return super().convert_batch(batch, augment)

    def _loader(self, dataset: ImageFiles, batch_size: int, train: bool) -> DataLoader:
        # Training order is a function of (seed, epoch), resumable mid-epoch (amalgam.callbacks.ExactResume).
        sampler = (ExactResume.sampler_for(self.trainer, len(dataset), batch_size) if train
                   else eval_sampler(self.trainer, dataset))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # A size-1 last batch breaks BatchNorm; still keep it when it is the only batch (of this rank).
            drop_last=train and (sampler.num_samples if sampler else len(dataset)) > batch_size,
            num_workers=self.num_workers,
            collate_fn=CollateSkipping(self.image_size, with_targets=dataset.targets is not None),
            pin_memory=pin_memory_default(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_paths is None:
            self.setup("fit")
        return self._loader(
            ImageFiles(self.train_paths, self.image_size, strict=self.strict), self.batch_size, True
        )

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_files is None:
            self.setup("validate")
        loaders = []
        for task in self.task_names:
            # Labels follow task_classes, which check_task_classes may have reordered after setup.
            label_of = {folder_name(name): label for label, name in enumerate(self.task_classes[task])}
            paths = [path for path, _ in self.eval_files[task]]
            labels = [label_of[name] for _, name in self.eval_files[task]]
            dataset = ImageFiles(paths, self.image_size, targets=labels, strict=self.strict)
            loaders.append(self._loader(dataset, self.eval_batch_size, train=False))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        paths = self.predict_paths
        dataset = ImageFiles(paths, self.image_size, targets=list(range(len(paths))), strict=self.strict)
        return self._loader(dataset, self.eval_batch_size, train=False)
