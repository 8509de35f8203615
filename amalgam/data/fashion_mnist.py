"""Fashion-MNIST split into tasks, from the files of the Debian package `dataset-fashion-mnist`."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from amalgam.callbacks import ExactResume
from amalgam.data.base import AmalgamDataModule, eval_sampler, pin_memory_default
from amalgam.data.idx import read_idx
from amalgam.data.in_memory import InMemoryImages, collate_batched

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_TASKS = {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def check_fashion_mnist_root(root: str | Path) -> Path:
    """`root` as a Path, after checking that all four IDX files are there."""
    root = Path(root).expanduser()
    for names in SPLIT_FILES.values():
        for name in names:
            if not (root / name).is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {root / name} is missing. Install the data with "
                    f"`sudo apt-get install dataset-fashion-mnist` (or run `make setup`), "
                    f"or point --data.init_args.root at a folder holding {', '.join(SPLIT_FILES['train'])} "
                    f"and {', '.join(SPLIT_FILES['test'])}."
                )
    return root


def load_fashion_mnist(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `split` ("train" or "test").

    Read once per root and process; callers must not modify the returned tensors.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {list(SPLIT_FILES)}, got {split!r}")
    return _load_cached(str(check_fashion_mnist_root(root).resolve()), split)


@functools.lru_cache(maxsize=4)
def _load_cached(root: str, split: str) -> tuple[Tensor, Tensor]:
    images_file, labels_file = (Path(root) / name for name in SPLIT_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file).long()
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{images_file} and {labels_file} do not match: images {tuple(images.shape)}, "
            f"labels {tuple(labels.shape)}; re-install dataset-fashion-mnist"
        )
    return images, labels


def validate_tasks(tasks: dict[str, list[int]]) -> dict[str, list[int]]:
    """Checks a task split of the 10 classes: named tasks, ids in 0..9, each class in one task at most."""
    if not tasks:
        raise ValueError("tasks is empty: give at least one task, e.g. {'a': [0, 1, 2, 3, 4]}")
    owner: dict[int, str] = {}
    for name, class_ids in tasks.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"task names must be non-empty strings, got {name!r} in tasks {tasks}")
        if not class_ids:
            raise ValueError(f"task {name!r} has no classes; give it Fashion-MNIST class ids 0..9")
        for class_id in class_ids:
            if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id <= 9:
                raise ValueError(f"task {name!r} has class id {class_id!r}; Fashion-MNIST class ids are 0..9")
            if class_id in owner:
                where = "twice" if owner[class_id] == name else f"and in task {owner[class_id]!r}"
                raise ValueError(
                    f"class {class_id} ({FASHION_MNIST_CLASSES[class_id]}) is in task {name!r} {where}"
                )
            owner[class_id] = name
    return {name: list(class_ids) for name, class_ids in tasks.items()}


def _limit(rows: Tensor, limit: int | None, seed: int) -> Tensor:
    """A fixed random subset of `limit` rows, kept in their original order."""
    if limit is None or limit >= len(rows):
        return rows
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
    return rows[keep.sort().values]


class FashionMNISTDataModule(AmalgamDataModule):
    """Fashion-MNIST (28x28 gray, shipped as 3-channel uint8) split into tasks of classes.

    Amalgamation mode (`supervised_task` None): the train loader yields bare uint8 image
    batches [B, 3, 28, 28] of every training image whose class is in some task; labels are
    only used for that filter, never returned. Validation and test yield a list of loaders,
    one per task in `task_names` order, with batches `(images, labels)`, label = index into
    `task_classes[task]`.

    Supervised mode (`supervised_task` set, to train one teacher): train batches are
    `(images, labels)` of that task's training images; validation and test are one loader of
    its test images; `task_classes` holds that task only.

    Fashion-MNIST has no validation split, so validation uses the test split (val == test).
    Predict batches are `(images, indices)` over the evaluated test images, where an index is
    the image's row in the Fashion-MNIST test split.

    Args:
        root: Folder with the four `*-ubyte.gz` files (Debian package dataset-fashion-mnist).
        tasks: Task name -> Fashion-MNIST class ids 0..9 (a class in one task at most).
            Default {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]}.
        supervised_task: Name of one task to train on with labels (a specialist teacher);
            None trains a student on unlabeled images of all tasks.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: DataLoader worker processes (0 is fast here: the data sits in memory).
        padding: Zero-padding, in pixels, before the random training crop (0 = no crop).
        flip: Randomly mirror training images left-right.
        train_limit: Use only this many training images (a fixed random subset); for quick runs.
        eval_limit: Use only this many test images per task (a fixed random subset).
        seed: Seed that picks the `train_limit` and `eval_limit` subsets.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        tasks: dict[str, list[int]] | None = None,
        supervised_task: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        padding: int = 2,
        flip: bool = True,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        all_tasks = validate_tasks(DEFAULT_TASKS if tasks is None else tasks)
        if supervised_task is not None and supervised_task not in all_tasks:
            raise ValueError(
                f"supervised_task {supervised_task!r} is not a task; the tasks are {list(all_tasks)}"
            )
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size}
        for name, value in {**sizes, "train_limit": train_limit, "eval_limit": eval_limit}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if padding < 0 or num_workers < 0:
            raise ValueError(f"padding and num_workers must be >= 0, got {padding} and {num_workers}")
        self.root = check_fashion_mnist_root(root)  # fail now, not after the model is built
        self.supervised_task = supervised_task
        # The tasks this module serves: all of them, or the one being trained with labels.
        self.tasks = {supervised_task: all_tasks[supervised_task]} if supervised_task else all_tasks
        self.task_classes = {
            name: [FASHION_MNIST_CLASSES[i] for i in ids] for name, ids in self.tasks.items()
        }
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.padding, self.flip = padding, flip
        self.train_limit, self.eval_limit, self.seed = train_limit, eval_limit, seed
        self.train_set: InMemoryImages | None = None
        self.eval_sets: dict[str, InMemoryImages] | None = None
        self.predict_set: InMemoryImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._build_train_set()
        if stage in ("fit", "validate", "test", None) and self.eval_sets is None:
            self.eval_sets = self._build_eval_sets()
        if stage in ("predict", None) and self.predict_set is None:
            self.predict_set = self._build_predict_set()

    def _label_table(self, class_ids: list[int]) -> Tensor:
        # Fashion-MNIST class id -> index in the task's class list.
        table = torch.full((len(FASHION_MNIST_CLASSES),), -1, dtype=torch.long)
        table[class_ids] = torch.arange(len(class_ids))
        return table

    def _rows_of(self, labels: Tensor, class_ids: list[int], limit: int | None) -> Tensor:
        rows = torch.isin(labels, torch.tensor(class_ids)).nonzero().squeeze(1)
        return _limit(rows, limit, self.seed)

    def _build_train_set(self) -> InMemoryImages:
        images, labels = load_fashion_mnist(self.root, "train")
        class_ids = [i for ids in self.tasks.values() for i in ids]
        rows = self._rows_of(labels, class_ids, self.train_limit)
        if self.supervised_task is None:
            return InMemoryImages(images[rows].unsqueeze(1))
        return InMemoryImages(images[rows].unsqueeze(1), self._label_table(class_ids)[labels[rows]])

    def _build_eval_sets(self) -> dict[str, InMemoryImages]:
        images, labels = load_fashion_mnist(self.root, "test")
        eval_sets = {}
        for name, class_ids in self.tasks.items():
            rows = self._rows_of(labels, class_ids, self.eval_limit)
            eval_sets[name] = InMemoryImages(
                images[rows].unsqueeze(1), self._label_table(class_ids)[labels[rows]]
            )
        return eval_sets

    def _build_predict_set(self) -> InMemoryImages:
        images, labels = load_fashion_mnist(self.root, "test")
        rows = torch.cat([self._rows_of(labels, ids, self.eval_limit) for ids in self.tasks.values()])
        rows = rows.sort().values
        return InMemoryImages(images[rows].unsqueeze(1), rows)

    def _loader(self, dataset: InMemoryImages, batch_size: int, train: bool) -> DataLoader:
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
            collate_fn=collate_batched,
            pin_memory=pin_memory_default(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.eval_sets is None:
            self.setup("validate")
        loaders = [
            self._loader(self.eval_sets[name], self.eval_batch_size, train=False) for name in self.task_names
        ]
        return loaders[0] if self.supervised_task else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        return self._loader(self.predict_set, self.eval_batch_size, train=False)
