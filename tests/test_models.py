"""Small-image timm variants: built by name like any timm model, without the stem max-pool."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

import amalgam.models  # noqa: F401  (registers the variants with timm)


@pytest.mark.parametrize(("name", "blocks"), [("amalgam_resnet14_nopool", [1, 1, 2, 2]),
                                               ("amalgam_resnet18_nopool", [2, 2, 2, 2]),
                                               ("amalgam_resnet10t_nopool", [1, 1, 1, 1])])
def test_nopool_variants_keep_the_stem_resolution(name, blocks):
    model = timm.create_model(name, num_classes=7, channels=[8, 8, 16, 16])
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    # 28 px -> 14 px stem -> 14, 7, 4, 2: the last stage keeps a 2x2 map (1x1 with the max-pool).
    maps = model.forward_intermediates(torch.rand(2, 3, 28, 28), intermediates_only=True)
    assert [m.shape[-1] for m in maps[-4:]] == [14, 7, 4, 2]
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 7)


def test_resnet14_nopool_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("amalgam_resnet14_nopool", pretrained=True)


@pytest.mark.parametrize("family", ["resnet", "vit", "convnext", "swin", "distilled"])
def test_tapped_logits_are_the_models_own_forward(family):
    """Taps read at a stage and the pooled vector, logits from the model's own head: in eval mode the same
    numbers as the plain timm model, also for heads that are not a single layer (a distilled ViT has two)."""
    from conftest import SIZE, TINY

    from amalgam.backbones import TappedNetwork

    spec = TINY[family] if family != "distilled" else {
        "arch": "deit_tiny_distilled_patch16_224",
        "model_kwargs": {"img_size": SIZE, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}}
    torch.manual_seed(0)
    net = TappedNetwork(spec["arch"], 3, ["pooled", -1], SIZE, model_kwargs=spec["model_kwargs"]).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = net(images)
        expected = net.model(net.preprocess(images))
    torch.testing.assert_close(out.logits, expected)
    assert out.taps[0].shape == (2, net.model.num_features) and out.taps[1].ndim == 4


# --------------------------------------------------------------------------------------------------------
# Errors that name the bad input: a network's arch and preprocessing, a checkpoint path or file


@pytest.mark.parametrize(("arch", "suggested"), [("resnet10tt", "'resnet10t'"),  # a typo: spelling neighbours
                                                 ("vit", "'convit_base'")])  # a bare stem: names containing it
def test_an_unknown_arch_names_the_teacher_and_close_timm_names(arch, suggested):
    from amalgam import Teacher

    with pytest.raises(ValueError, match=rf"^teacher 'a' \({arch}\): unknown architecture '{arch}', not a timm "
                                         rf"model name\. Did you mean one of \[.*{suggested}"):
        Teacher("a", ["x", "y"], arch)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("mean", [0.5, 0.5], r"'mean' has 2 values \[0\.5, 0\.5\]; give 1 \(all channels\) or 3"),
    ("std", [], r"'std' has 0 values \[\]; give 1"),
    ("std", [0.0, 0.0, 0.0], r"'std' is \[0\.0, 0\.0, 0\.0\]; every value must be > 0"),
    ("std", [0.5, -0.5, 0.5], r"'std' is \[0\.5, -0\.5, 0\.5\]; every value must be > 0"),
    ("input_size", 0, r"'input_size' is 0; give the side in pixels \(at least 1\)"),
])
def test_bad_preprocessing_is_refused_naming_the_network_and_key(key, value, expected):
    """Caught when the network is built: otherwise a size mismatch in the first step, a NaN loss, or (0) the
    default size used silently."""
    from conftest import TINY, student, teacher

    from amalgam import Teacher
    from amalgam.backbones import TappedNetwork

    with pytest.raises(ValueError, match=rf"^teacher 'a' \(resnet10t\): {expected}"):
        Teacher(**{**teacher("a", "resnet"), key: value})
    spec = {**student(), key: value}
    with pytest.raises(ValueError, match=rf"^student \(resnet18\): {expected}"):
        TappedNetwork(spec["arch"], 3, spec["taps"], spec["input_size"], spec.get("mean"), spec.get("std"),
                      TINY["student"]["model_kwargs"], owner="student (resnet18)")


def test_a_folder_given_as_checkpoint_is_named_a_folder(tmp_path):
    from conftest import teacher

    from amalgam import Teacher
    from amalgam.checkpointing import AtomicCheckpointIO

    folder = tmp_path / "ckdir"
    folder.mkdir()
    (folder / "teacher_a.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=rf"^teacher 'a': Checkpoint '{folder}' is a folder, not a file: "
                                                rf"give the path of the checkpoint file itself \(it holds "
                                                rf"\['teacher_a\.ckpt'\]\)"):
        Teacher(**teacher("a", "resnet", checkpoint=str(folder)))
    with pytest.raises(IsADirectoryError, match=rf"Checkpoint '{folder}' is a folder"):
        AtomicCheckpointIO().load_checkpoint(folder)  # --ckpt_path, export --ckpt


def test_a_missing_relative_checkpoint_shows_where_it_was_looked_for(tmp_path, monkeypatch):
    from conftest import teacher

    from amalgam import Teacher

    monkeypatch.chdir(tmp_path)
    expected = (f"teacher 'a': Checkpoint 'artifacts/fashion/teacher_a.ckpt' (looked up from {tmp_path}: "
                f"{tmp_path}/artifacts/fashion/teacher_a.ckpt) does not exist. Check the path in your config.")
    with pytest.raises(FileNotFoundError) as info:
        Teacher(**teacher("a", "resnet", checkpoint="artifacts/fashion/teacher_a.ckpt"))
    assert str(info.value) == expected


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def _not_a_checkpoint(tmp_path, kind: str):
    """A file with a checkpoint's name that holds something else, and what its error must say."""
    path = tmp_path / "teacher_a.pth"
    if kind == "lfs pointer":  # a clone made without git-lfs
        path.write_text(LFS_POINTER)
        return path, r"it is a Git LFS pointer .*\. Run `git lfs pull` in its repository to download the real file\."
    if kind == "png":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(path, format="PNG")
    else:  # text that reads as pickle opcodes: "T" an unsupported one, "c" a GLOBAL of two lines
        path.write_text({"text": "These weights moved to the model hub.\n", "text c": "checkpoint\nmoved\n"}[kind])
    return path, r"it is not a PyTorch checkpoint \(neither a zip archive nor a pickle\)\. Is it the right file\?"


@pytest.mark.parametrize("kind", ["lfs pointer", "png", "text", "text c"])
def test_a_file_that_is_no_checkpoint_is_named_so_not_refused_as_code(tmp_path, kind):
    """torch's weights-only unpickler raises the same UnpicklingError for such bytes as for a planted pickle:
    no advice to run it as code (--weights_only false), which would fail too."""
    from amalgam.backbones import read_state_dict
    from amalgam.checkpointing import AtomicCheckpointIO

    path, expected = _not_a_checkpoint(tmp_path, kind)
    messages = []
    for load in (read_state_dict, AtomicCheckpointIO().load_checkpoint):  # a teacher's; --ckpt_path, export
        with pytest.raises(ValueError, match=rf"^Cannot read checkpoint '{path}': {expected}$") as info:
            load(path)
        messages.append(str(info.value))
    # cli.py reads --ckpt_path itself, lazily (mmap: torch then fails first on any file that is no zip archive).
    from amalgam.checkpointing import checkpoint_error
    from amalgam.cli import load_lazily

    for mmap in (False, True):
        with pytest.raises(Exception) as info:
            load_lazily(str(path), weights_only=True) if mmap else torch.load(path, weights_only=True)
        messages.append(str(checkpoint_error(path, info.value)))
    assert len(messages) == 4
    for message in messages:
        assert re.fullmatch(rf"Cannot read checkpoint '{path}': {expected}", message), message


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickle_that_needs_a_class_is_still_refused_as_code(tmp_path, zipped):
    import argparse

    from amalgam.backbones import read_state_dict
    from amalgam.checkpointing import AtomicCheckpointIO

    path = tmp_path / "teacher_a.pth"
    torch.save({"w": torch.zeros(2), "notes": argparse.Namespace(a=1)}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"^Refused to load '.*teacher_a\.pth'.*GLOBAL argparse\.Namespace.*"
                                         r"running pickled code"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=r"^Refused to load checkpoint .*GLOBAL argparse\.Namespace.*"
                                         r"--weights_only false"):
        AtomicCheckpointIO().load_checkpoint(path)
