"""Tests of amalgam.data: Fashion-MNIST tasks, on-device augmentation, image folders."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_png
from PIL import Image
from torch.utils.data import DataLoader

from amalgam.data import (
    FASHION_MNIST_CLASSES,
    AmalgamDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    random_crop_flip,
    scan_images,
)
from amalgam.data.augment import crop_flip, mix_images, sample_crop_flip, strong_view, to_float
from amalgam.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from amalgam.data.idx import read_idx
from amalgam.data.image_files import BadImageError, SkipCounted, decode_rgb, load_image

needs_fashion = pytest.mark.skipif(
    not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)",
)


def image_bytes(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


# ---------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_idx_parsing_of_the_real_files():
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert 0 < images.float().mean() < 255 and images.max() == 255
    test_images, test_labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    assert test_images.shape == (10000, 28, 28) and test_labels[:5].tolist() == [9, 2, 1, 1, 6]
    # Cached: a second load returns the very same tensors.
    assert load_fashion_mnist(DEFAULT_ROOT, "train")[0] is images


def test_idx_parsing_of_a_written_file(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "x.gz", "wb") as file:
        file.write(header + array.tobytes())
    assert torch.equal(read_idx(tmp_path / "x.gz"), torch.from_numpy(array))

    with gzip.open(tmp_path / "short.gz", "wb") as file:
        file.write(header + array.tobytes()[:-1])
    with pytest.raises(ValueError, match="short.gz"):
        read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "magic.gz", "wb") as file:
        file.write(b"\x01\x02\x03\x04" + array.tobytes())
    with pytest.raises(ValueError, match="magic.gz.*not an IDX"):
        read_idx(tmp_path / "magic.gz")


@needs_fashion
def test_task_classes_without_setup():
    dm = FashionMNISTDataModule(tasks={"x": [3, 0], "y": [9]})
    assert dm.task_classes == {"x": ["Dress", "T-shirt/top"], "y": ["Ankle boot"]}
    assert dm.task_names == ["x", "y"]
    default = FashionMNISTDataModule()
    assert default.task_classes == {"a": FASHION_MNIST_CLASSES[:5], "b": FASHION_MNIST_CLASSES[5:]}


@needs_fashion
def test_unlabeled_train_batches_hold_only_images_of_the_task_classes():
    dm = FashionMNISTDataModule(tasks={"x": [0, 1], "y": [7]}, batch_size=256)
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "train")
    in_tasks = torch.isin(labels, torch.tensor([0, 1, 7]))
    loader = dm.train_dataloader()
    assert len(dm.train_set) == 18000
    allowed, excluded = (
        image_bytes(images[in_tasks]),
        image_bytes(images[~in_tasks]) - image_bytes(images[in_tasks]),
    )
    for batch_index, batch in zip(range(3), loader):
        assert isinstance(batch, torch.Tensor)  # bare tensor: no labels travel with it
        assert batch.dtype == torch.uint8 and batch.shape == (256, 3, 28, 28)
        assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])
        gray = image_bytes(batch[:, 0])
        assert gray <= allowed and not gray & excluded


@needs_fashion
def test_eval_loaders_one_per_task_with_task_labels():
    dm = FashionMNISTDataModule(tasks={"x": [3, 0], "y": [9]}, eval_batch_size=4000)
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    _, test_labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    x_images, x_labels = next(iter(loaders[0]))
    assert x_images.dtype == torch.uint8 and x_images.shape == (2000, 3, 28, 28)
    assert x_labels.dtype == torch.int64
    # Label = index in the task's class list: Dress (3) -> 0, T-shirt/top (0) -> 1.
    assert x_labels.bincount().tolist() == [1000, 1000]
    expected = torch.where(test_labels[torch.isin(test_labels, torch.tensor([0, 3]))] == 3, 0, 1)
    assert torch.equal(x_labels, expected)
    y_images, y_labels = next(iter(loaders[1]))
    assert len(y_images) == 1000 and (y_labels == 0).all()
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [2000, 1000]


@needs_fashion
def test_supervised_mode_gives_labeled_batches_of_one_task():
    dm = FashionMNISTDataModule(supervised_task="b", batch_size=64, eval_limit=50)
    assert dm.task_names == ["b"] and dm.task_classes == {"b": FASHION_MNIST_CLASSES[5:]}
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "train")
    batch_images, batch_labels = next(iter(dm.train_dataloader()))
    assert batch_images.dtype == torch.uint8 and batch_images.shape == (64, 3, 28, 28)
    assert batch_labels.dtype == torch.int64 and 0 <= batch_labels.min() and batch_labels.max() <= 4
    # Label k of task b is Fashion-MNIST class 5 + k.
    assert torch.equal(dm.train_set.targets.bincount(), torch.full((5,), 6000))
    assert torch.equal(dm.train_set.images[dm.train_set.targets == 2, 0], images[labels == 7])
    val = dm.val_dataloader()
    assert isinstance(val, DataLoader) and len(val.dataset) == 50


@needs_fashion
def test_limits_pick_a_fixed_subset():
    def subset(seed):
        dm = FashionMNISTDataModule(train_limit=100, eval_limit=10, seed=seed)
        dm.setup("fit")
        return dm

    first, again, other = subset(0), subset(0), subset(1)
    assert len(first.train_set) == 100 and [len(s) for s in first.eval_sets.values()] == [10, 10]
    assert torch.equal(first.train_set.images, again.train_set.images)
    assert not torch.equal(first.train_set.images, other.train_set.images)
    # 100 images < one batch of 128: still one (partial) training batch.
    assert len(first.train_dataloader()) == 1


@needs_fashion
def test_predict_batches_are_images_and_test_split_rows():
    dm = FashionMNISTDataModule(tasks={"x": [1]}, eval_limit=30, eval_batch_size=16)
    test_images, test_labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    batches = list(dm.predict_dataloader())
    images = torch.cat([images for images, _ in batches])
    rows = torch.cat([rows for _, rows in batches])
    assert len(rows) == 30 and (test_labels[rows] == 1).all()
    assert torch.equal(images[:, 0], test_images[rows])


@needs_fashion
@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"a": [0, 1], "b": [1, 2]}, "class 1 .* in task 'b' and in task 'a'"),
        ({"a": [0, 0]}, "twice"),
        ({"a": [0, 10]}, "class id 10"),
        ({"a": [-1]}, "class id -1"),
        ({"": [0]}, "non-empty"),
        ({"a": []}, "no classes"),
        ({}, "empty"),
    ],
)
def test_bad_tasks_are_rejected(tasks, message):
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(tasks=tasks)


@needs_fashion
def test_unknown_supervised_task_lists_the_tasks():
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\]"):
        FashionMNISTDataModule(supervised_task="c")


def test_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "nowhere" in message
    assert "--data.init_args.root" in message


# ---------------------------------------------------------------- augmentation


def random_images(batch=8, height=10, width=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def test_random_crop_flip_shape_dtype_range():
    images = random_images()
    out = random_crop_flip(images, padding=3, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(to_float(images) * 255, images.float())


def test_no_padding_no_flip_is_plain_conversion():
    images = random_images()
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), to_float(images))


def test_flips_really_flip():
    images = random_images(batch=64)
    out = random_crop_flip(images, padding=0, flip=True, generator=torch.Generator().manual_seed(5))
    _, flips = sample_crop_flip(64, 0, True, torch.Generator().manual_seed(5))
    assert 0 < flips.sum() < 64
    expected = torch.where(flips[:, None, None, None], to_float(images).flip(-1), to_float(images))
    assert torch.equal(out, expected)


def test_crops_differ_per_sample():
    one = random_images(batch=1).expand(32, -1, -1, -1)
    out = random_crop_flip(one, padding=4, flip=False, generator=torch.Generator().manual_seed(0))
    distinct = {sample.numpy().tobytes() for sample in out}
    assert len(distinct) > 10


def naive_crop_flip(images, offsets, flips, padding):
    out = []
    for image, (top, left), flip in zip(images, offsets.tolist(), flips.tolist()):
        padded = F.pad(image, (padding,) * 4)
        window = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        out.append(window.flip(-1) if flip else window)
    return torch.stack(out)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_vectorized_crop_matches_a_per_sample_loop(padding):
    images = to_float(random_images(batch=16, height=9, width=7))
    offsets, flips = sample_crop_flip(16, padding, True, torch.Generator().manual_seed(padding))
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    assert torch.equal(
        crop_flip(images, offsets, flips, padding), naive_crop_flip(images, offsets, flips, padding)
    )
    # random_crop_flip draws the same offsets and flips from the same generator state.
    out = random_crop_flip(
        random_images(batch=16, height=9, width=7), padding, True, torch.Generator().manual_seed(padding)
    )
    assert torch.equal(out, naive_crop_flip(images, offsets, flips, padding))


def test_batch_hook_augments_only_while_training():
    images = random_images(batch=32)
    labels = torch.arange(32)
    dm = AmalgamDataModule()
    dm.padding, dm.flip = 4, True
    assert torch.equal(dm.on_after_batch_transfer(images, 0), to_float(images))  # no trainer
    dm.trainer = SimpleNamespace(training=False)
    out_images, out_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(out_images, to_float(images)) and out_labels is labels
    dm.trainer = SimpleNamespace(training=True)
    augmented = dm.on_after_batch_transfer(images, 0)
    assert augmented.dtype == torch.float32 and not torch.equal(augmented, to_float(images))
    as_list = dm.on_after_batch_transfer([images, labels], 0)
    assert isinstance(as_list, list) and as_list[1] is labels


# ---------------------------------------------------------------- Lightning end to end


class BatchProbe(pl.LightningModule):
    """Records what the training, validation and predict steps receive."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch)
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return (images.mean() * self.weight).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_batches.append((dataloader_idx, batch))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quick_trainer():
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@needs_fashion
def test_lightning_sees_float_batches_in_the_contract_shapes():
    dm = FashionMNISTDataModule(batch_size=8, eval_batch_size=5, train_limit=64, eval_limit=10)
    probe = BatchProbe()
    quick_trainer().fit(probe, datamodule=dm)
    (train,) = probe.train_batches
    assert isinstance(train, torch.Tensor) and train.dtype == torch.float32 and train.shape == (8, 3, 28, 28)
    assert [index for index, _ in probe.val_batches] == [0, 1]
    for _, (images, labels) in probe.val_batches:
        assert (
            images.dtype == torch.float32 and images.shape == (5, 3, 28, 28) and labels.dtype == torch.int64
        )
    predictions = quick_trainer().predict(probe, datamodule=dm)
    images, rows = predictions[0]
    assert images.dtype == torch.float32 and rows.dtype == torch.int64 and len(rows) == 5


# ---------------------------------------------------------------- image folders

GOOD_FILES = [
    "a.png", "sub/b.jpg", "sub/deeper/c.webp", "d.JPEG", "gray.png", "rgba.png",
    "gray16.png", "cmyk.jpg", "palette.png", "e.bmp",
]  # fmt: skip
BAD_FILES = ["zero.jpg", "truncated.jpg", "text.jpg"]


def write_image_tree(root: Path) -> Path:
    """Good images of assorted modes and sizes, bad files, and files that are not images."""
    for name in ("sub/deeper", ".cache"):
        (root / name).mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "a.png")
    Image.new("RGB", (50, 70), (10, 200, 10)).save(root / "sub/b.jpg")
    Image.new("RGB", (33, 21), (10, 10, 200)).save(root / "sub/deeper/c.webp")
    Image.new("RGB", (64, 64), (120, 120, 120)).save(root / "d.JPEG", format="JPEG")
    Image.new("L", (20, 25), 77).save(root / "gray.png")
    Image.new("RGBA", (30, 30), (0, 0, 255, 0)).save(root / "rgba.png")
    Image.fromarray(np.full((18, 24), 0x8000, dtype=np.uint16)).save(root / "gray16.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK
    Image.new("P", (16, 40), 3).save(root / "palette.png")
    Image.new("RGB", (26, 26), (1, 2, 250)).save(root / "e.bmp")
    (root / "zero.jpg").write_bytes(b"")
    full = root / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[:600])
    full.unlink()
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("not an image extension")
    Image.new("RGB", (8, 8)).save(root / ".cache/hidden.png")
    Image.new("RGB", (8, 8)).save(root / "._resource_fork.jpg")
    return root


@pytest.fixture
def image_tree(tmp_path):
    return write_image_tree(tmp_path / "train")


def write_eval_folder(root: Path) -> Path:
    """Task folder with classes cat (black images) and dog (white images)."""
    for name, value, count in (("cat", 0, 3), ("dog", 255, 2)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (20, 24), (value,) * 3).save(root / name / f"{index}.png")
    return root


def test_scan_images_is_recursive_sorted_and_case_insensitive(image_tree):
    paths = scan_images(image_tree)
    assert paths == sorted(image_tree / name for name in GOOD_FILES + BAD_FILES)


def test_scan_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty holds no images.*\.jpg.*\.webp"):
        scan_images(tmp_path / "empty")


def test_every_good_image_decodes_to_a_uint8_square(image_tree):
    for name in GOOD_FILES:
        image = load_image(image_tree / name, 16)
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16), name
    gray = decode_rgb(image_tree / "gray.png")
    assert gray.shape == (3, 25, 20) and (gray == 77).all()
    assert (decode_rgb(image_tree / "gray16.png") == 128).all()  # 16-bit scaled, not clipped to 255
    red = decode_rgb(image_tree / "cmyk.jpg").float().mean((1, 2))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert decode_rgb(image_tree / "e.bmp")[:, 0, 0].tolist() == [1, 2, 250]  # via Pillow
    assert decode_rgb(image_tree / "rgba.png")[:, 0, 0].tolist() == [0, 0, 255]  # alpha dropped
    tall = load_image(image_tree / "sub/b.jpg", 16)  # 50x70: shorter side to 16, then center crop
    assert tall.float().mean((1, 2)).argmax() == 1


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_exif_orientation_is_applied_in_every_format(tmp_path, suffix):
    from PIL import ImageOps

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn: 8 wide, 12 high
    path = tmp_path / f"rotated.{suffix}"
    image.save(path, exif=exif, **({"quality": 100} if suffix == "jpg" else {"lossless": True} if suffix == "webp"
                                   else {}))
    with Image.open(path) as opened:
        shown = torch.from_numpy(np.asarray(ImageOps.exif_transpose(opened).convert("RGB")).copy()).permute(2, 0, 1)
    decoded = decode_rgb(path)
    assert decoded.shape == shown.shape == (3, 12, 8)
    assert (decoded.int() - shown.int()).abs().max() <= 1


def test_linked_folders_are_read_once_even_when_a_link_points_back_up(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "a" / "x.png", rng, (8, 8))
    write_png(tmp_path / "top.png", rng, (8, 8))
    (tmp_path / "a" / "up").symlink_to(tmp_path)  # a loop
    (tmp_path / "again").symlink_to(tmp_path / "a")  # a second way into a
    paths = scan_images(tmp_path)
    assert len(paths) == 2 and {p.name for p in paths} == {"x.png", "top.png"}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_naming_the_file(image_tree, name):
    with pytest.raises(BadImageError, match=name):
        decode_rgb(image_tree / name)


def rank_one_of_two(dm):
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, callbacks=[])
    return dm


def test_a_ddp_rank_with_less_than_a_batch_keeps_its_only_batch(image_tree):
    dm = rank_one_of_two(ImageFolderDataModule(str(image_tree), image_size=16, batch_size=8, num_workers=0))
    assert len(dm.train_dataloader()) == 1  # 13 files, 7 on this rank: one short batch, not none


@needs_fashion
def test_a_ddp_rank_with_less_than_a_batch_keeps_its_only_fashion_batch():
    dm = rank_one_of_two(FashionMNISTDataModule(batch_size=8, train_limit=13))
    assert len(dm.train_dataloader()) == 1


def test_bad_files_are_skipped_counted_and_warned_once(image_tree, caplog):
    dm = ImageFolderDataModule(str(image_tree), image_size=16, batch_size=4, num_workers=0)
    loader = dm.train_dataloader()
    total_images, skipped_reads, skipped_paths = 0, 0, set()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two epochs: a bad file read twice counts once, and is warned about once
            for batch in loader:
                assert isinstance(batch, SkipCounted)
                skipped_reads += len(batch.skipped)
                skipped_paths.update(batch.skipped)
                images = dm.on_after_batch_transfer(batch, 0)
                assert isinstance(images, torch.Tensor) and images.dtype == torch.float32
                assert images.shape[1:] == (3, 16, 16)
                total_images += len(images)
    # 13 files, 4 per batch, the partial last batch dropped: 12 seen per epoch.
    assert total_images + skipped_reads == 24
    assert skipped_reads > len(skipped_paths) > 0  # some bad file was read in both epochs
    assert dm.skipped_files == skipped_paths and dm.skipped_total == len(skipped_paths)
    assert all(Path(path).name in BAD_FILES for path in skipped_paths)
    warned = [record.getMessage() for record in caplog.records if "skipping bad image" in record.getMessage()]
    assert len(warned) == len({message for message in warned}) <= 3
    assert all(any(name in message for name in BAD_FILES) for message in warned)


def test_predict_skips_bad_files_and_indexes_predict_paths(image_tree):
    dm = ImageFolderDataModule(str(image_tree), image_size=8, batch_size=64, num_workers=0)
    assert dm.predict_paths == scan_images(image_tree)
    (batch,) = list(dm.predict_dataloader())
    images, indices = dm.on_after_batch_transfer(batch, 0)
    assert images.shape == (len(GOOD_FILES), 3, 8, 8) and dm.skipped_total == len(BAD_FILES)
    assert sorted(dm.predict_paths[i].name for i in indices.tolist()) == sorted(
        Path(n).name for n in GOOD_FILES
    )


def test_strict_mode_raises_naming_the_file(image_tree):
    dm = ImageFolderDataModule(str(image_tree), image_size=8, batch_size=64, num_workers=0, strict=True)
    with pytest.raises(ValueError, match=r"(zero|truncated|text)\.jpg.*strict"):
        next(iter(dm.predict_dataloader()))


def test_eval_labels_follow_the_teacher_class_order(tmp_path):
    train = write_eval_folder(tmp_path / "train")
    dm = ImageFolderDataModule(
        str(train),
        eval_dirs={"pets": str(write_eval_folder(tmp_path / "pets"))},
        image_size=8,
        batch_size=2,
        eval_batch_size=16,
        num_workers=0,
    )
    assert dm.task_classes == {"pets": ["cat", "dog"]} and dm.task_names == ["pets"]
    dm.setup("fit")
    dm.check_task_classes({"pets": ["dog", "cat"], "unused_teacher_task": ["x"]})
    assert dm.task_classes == {"pets": ["dog", "cat"]}
    (loader,) = dm.val_dataloader()
    images, labels = dm.on_after_batch_transfer(next(iter(loader)).batch, 0)
    assert labels.dtype == torch.int64 and labels.tolist().count(0) == 2  # two dog images
    brightness = images.mean((1, 2, 3))
    assert torch.equal(brightness > 0.5, labels == 0)  # dog (white) -> teacher label 0


def test_class_names_with_a_slash_or_decomposed_accents_find_their_folders(tmp_path):
    import unicodedata

    root = tmp_path / "clothes"
    # "T-shirt/top" cannot name a folder; an accented name as macOS writes it (decomposed, NFD).
    for name, value in (("T-shirt_top", 0), (unicodedata.normalize("NFD", "Café"), 128), ("Coat", 255)):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (value,) * 3).save(root / name / "0.png")
    dm = ImageFolderDataModule(str(root), eval_dirs={"c": str(root)}, image_size=8, batch_size=2, eval_batch_size=8,
                               num_workers=0)
    dm.setup("validate")
    dm.check_task_classes({"c": ["Coat", "Café", "T-shirt/top"]})  # the YAML's (composed) names
    assert dm.task_classes == {"c": ["Coat", "Café", "T-shirt/top"]}
    (loader,) = dm.val_dataloader()
    images, labels = dm.on_after_batch_transfer(next(iter(loader)).batch, 0)
    by_label = dict(zip(labels.tolist(), (images.mean((1, 2, 3)) * 255).round().tolist()))
    assert by_label == {0: 255, 1: pytest.approx(128, abs=1), 2: 0}
    with pytest.raises(ValueError, match="would share one evaluation folder"):
        dm.check_task_classes({"c": ["a/b", "a_b", "Coat"]})
    # A Classifier validated on these folders matches its class names the same way.
    from amalgam import Classifier

    classifier = Classifier(classes=["T-shirt/top", "Coat", "Café"], task="c", arch="resnet10t", input_size=8)
    dm = ImageFolderDataModule(str(root), eval_dirs={"c": str(root)}, image_size=8, batch_size=2, num_workers=0)
    classifier.trainer = SimpleNamespace(datamodule=dm)
    classifier.setup("validate")
    assert dm.task_classes == {"c": ["T-shirt/top", "Coat", "Café"]}


def test_images_are_read_at_the_model_s_input_size_unless_given(tmp_path):
    pets = write_eval_folder(tmp_path / "pets")
    dm = ImageFolderDataModule(str(pets), num_workers=0, batch_size=2)
    assert dm.image_size == 224  # no model to ask
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(student=SimpleNamespace(input_size=20)),
                                 training=False)
    assert dm.image_size == 20
    images, _ = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())).batch, 0)
    assert images.shape[-2:] == (20, 20)
    # No teacher sees an upsampled image: the largest of the networks' sizes.
    teachers = [SimpleNamespace(net=SimpleNamespace(input_size=s)) for s in (24, 16)]
    dm.trainer.lightning_module.teachers = teachers
    assert dm.image_size == 24
    assert ImageFolderDataModule(str(pets), image_size=12, num_workers=0).image_size == 12


def test_eval_class_mismatch_names_both_sides(tmp_path):
    pets = write_eval_folder(tmp_path / "pets")
    dm = ImageFolderDataModule(str(pets), eval_dirs={"pets": str(pets)}, num_workers=0)
    with pytest.raises(ValueError) as error:
        dm.check_task_classes({"pets": ["cat", "bird"]})
    message = str(error.value)
    assert "'pets'" in message and str(pets) in message
    assert "missing folders: ['bird']" in message and "extra folders: ['dog']" in message
    with pytest.raises(ValueError, match=r"'pets'.*\['animals'\]"):
        dm.check_task_classes({"animals": ["cat", "dog"]})


def test_missing_folders_fail_at_init(tmp_path):
    pets = write_eval_folder(tmp_path / "pets")
    with pytest.raises(FileNotFoundError, match="no_train"):
        ImageFolderDataModule(str(tmp_path / "no_train"))
    with pytest.raises(FileNotFoundError, match="no_eval"):
        ImageFolderDataModule(str(pets), eval_dirs={"t": str(tmp_path / "no_eval")})
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataModule(str(pets), eval_dirs={"t": str(pets / "cat")})
    assert ImageFolderDataModule(str(pets)).task_classes == {}


def test_lightning_fit_on_image_folders(tmp_path):
    train = write_image_tree(tmp_path / "train")
    pets = write_eval_folder(tmp_path / "pets")
    dm = ImageFolderDataModule(
        str(train), eval_dirs={"pets": str(pets)}, image_size=12, batch_size=13, num_workers=0, padding=2
    )
    probe = BatchProbe()
    quick_trainer().fit(probe, datamodule=dm)
    (train_batch,) = probe.train_batches
    assert isinstance(train_batch, torch.Tensor) and train_batch.shape == (10, 3, 12, 12)
    assert dm.skipped_total == len(BAD_FILES)
    ((index, (images, labels)),) = probe.val_batches
    assert index == 0 and images.shape == (5, 3, 12, 12) and labels.tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------- strong view (self-labelling)

def hole_side(size: int, cutout: float) -> int:
    """The widest the zeroed square may be along a side of `size` pixels: 2 * half + 1."""
    return 2 * (max(1, round(cutout * size)) // 2) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_view_keeps_shape_dtype_device_and_input(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = torch.rand(6, 3, 12, 10, dtype=dtype, device=device)
    before = images.clone()
    torch.manual_seed(0)
    out = strong_view(images)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert torch.equal(images, before), "strong_view changed its input in place"
    assert not torch.equal(out, images)


@pytest.mark.parametrize(("size", "cutout"), [(16, 0.5), (32, 0.5), (20, 0.25)])
def test_strong_view_without_shift_zeroes_one_square_hole_per_image(size, cutout):
    # No shift: the crop is the image itself and a flip leaves all-ones unchanged, so every zero is the hole.
    ones = torch.ones(32, 3, size, size)
    torch.manual_seed(1)
    out = strong_view(ones, shift=0, cutout=cutout)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    hole = out == 0
    assert torch.equal(hole, hole[:, :1].expand_as(hole)), "the hole differs between channels"
    hole = hole[:, 0]
    side = hole_side(size, cutout)
    for mask in hole:
        rows, cols = mask.any(1), mask.any(0)
        assert mask.any(), "an image came back without a hole"
        assert torch.equal(mask, rows[:, None] & cols[None, :]), "the hole is not one axis-aligned rectangle"
        assert rows.sum() <= side and cols.sum() <= side
        assert mask.sum() <= (cutout * size + 1) ** 2
    # Holes at a random centre: they do not all sit at the same place, and some are whole squares.
    assert len({mask.numpy().tobytes() for mask in hole}) > 10
    assert (hole.flatten(1).sum(1) == side * side).any()


@pytest.mark.parametrize(("shift", "cutout"), [(4, 0.5), (2, 0.25)])
def test_strong_view_leaves_most_of_the_image_intact(shift, cutout):
    size = 32
    ones = torch.ones(64, 3, size, size)
    torch.manual_seed(2)
    zeros = (strong_view(ones, shift=shift, cutout=cutout) == 0).flatten(1).sum(1) / 3  # per image, per channel
    bound = hole_side(size, cutout) ** 2 + 2 * shift * size  # the hole plus the shifted-in border
    assert (zeros >= 1).all(), "an all-ones image came back without a zeroed pixel"
    assert (zeros <= bound).all() and bound < size * size * 0.6
    assert zeros.float().mean() < 0.5 * size * size


def test_strong_view_is_a_crop_flip_with_a_hole():
    # Strictly positive content: the only zeros come from the zero padding of the shift or from the hole.
    images = torch.rand(16, 3, 20, 20) + 0.1
    torch.manual_seed(3)
    out = strong_view(images, shift=3, cutout=0.5)
    torch.manual_seed(3)  # strong_view draws its shift and flip first, then the hole
    offsets, flips = sample_crop_flip(16, 3, True, device="cpu")
    assert 0 < flips.sum() < 16 and offsets.unique(dim=0).shape[0] > 1
    shifted = crop_flip(images, offsets, flips, 3)
    assert ((out == shifted) | (out == 0)).all(), "strong_view changed pixels other than zeroing some"
    hole = (out != shifted).any(1)
    per_image = hole.flatten(1).sum(1)
    assert (per_image >= 1).all() and (per_image <= hole_side(20, 0.5) ** 2).all()


def test_strong_view_reproduces_under_a_seed_and_differs_between_draws():
    images = torch.rand(8, 3, 16, 16)
    torch.manual_seed(4)
    first = strong_view(images)
    second = strong_view(images)
    torch.manual_seed(4)
    again = strong_view(images)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    # Each sample draws its own shift, flip and hole: one image repeated gives different views.
    repeated = strong_view(images[:1].expand(32, -1, -1, -1))
    assert len({view.numpy().tobytes() for view in repeated}) > 10


# ---------------------------------------------------------------- mixup without labels (function matching)

def test_mix_images_blends_each_image_with_one_partner_by_one_weight():
    # Image k is the constant k + 1 on its first pixel and 0 elsewhere: then out[i] = lam_i * (i + 1) at that
    # pixel plus (1 - lam_i) * (j + 1) at the partner's, and every other pixel stays 0.
    batch = 64
    images = torch.zeros(batch, 1, 1, batch)
    images[torch.arange(batch), 0, 0, torch.arange(batch)] = torch.arange(1.0, batch + 1)
    before = images.clone()
    torch.manual_seed(0)
    out = mix_images(images, 0.4)
    assert torch.equal(images, before) and out.shape == images.shape and out.dtype == images.dtype
    weights = out[:, 0, 0] / torch.arange(1.0, batch + 1)  # [image, source]: the share each source got
    own, partner = weights.diagonal(), weights.clone().fill_diagonal_(0)
    mixed, partners = partner.sum(1) > 1e-6, partner.argmax(1)
    assert len(set(partners[mixed].tolist())) == int(mixed.sum()), "two images share a partner: no permutation"
    # The two shares add to one (an image mixed with itself gets all of it), each share in [0, 1].
    torch.testing.assert_close(own + partner.sum(1), torch.ones(batch))
    assert ((own >= 0) & (own <= 1)).all() and (partner > 0).sum(1).max() <= 1
    # Beta(0.4, 0.4) is U-shaped: most weights near 0 or 1, and they differ between images.
    assert ((own < 0.2) | (own > 0.8)).float().mean() > 0.5 and own.std() > 0.2


def test_mix_images_follows_the_seed_and_rejects_a_bad_alpha():
    images = torch.rand(8, 3, 6, 6)
    torch.manual_seed(3)
    first = mix_images(images, 1.0)
    torch.manual_seed(3)
    torch.testing.assert_close(mix_images(images, 1.0), first)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mix_images(images, 0.0)
