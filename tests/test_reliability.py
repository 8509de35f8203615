"""Bad inputs end in a clear message or a counted skip; no checkpoint runs code; no run is lost.

Feeds each bad input through the real entry point (``amalgam.cli.entry_point``, what ``python -m amalgam``
runs) and checks what the user reads: the message, and no traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, amalgam_config, student, teacher, write_png
from PIL import Image
from safetensors.torch import save_file

from amalgam import AmalgamationModule, Teacher
from amalgam.backbones import TappedNetwork, default_preprocessing, read_state_dict
from amalgam.callbacks import ExactResume
from amalgam.checkpointing import AtomicCheckpointIO, ResumableSampler
from amalgam.cli import entry_point, main

# Subprocesses: offline, one intra-op thread (conftest sets the same for this process).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_entry(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``python -m amalgam <args>``, run in this process."""
    capsys.readouterr()
    try:
        code = entry_point(args)
    except SystemExit as exit_:  # jsonargparse's own config errors
        code = exit_.code
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Bad images: decoded or skipped and counted


def bad_image_folder(root: Path) -> Path:
    """16 plain PNGs, 4 odd but decodable images, 4 unreadable files: 24 files, 3 batches of 8."""
    rng = np.random.default_rng(1)
    for i in range(16):
        write_png(root / f"good{i}.png", rng, (40, 40))
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(root / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    (root / "corrupt.png").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    (root / "truncated.png").write_bytes((root / "good0.png").read_bytes()[:200])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image at all")
    return root


def test_fit_counts_and_logs_skipped_images(tmp_path, image_tree):
    folder = bad_image_folder(tmp_path / "train")
    cfg = amalgam_config(tmp_path, {**image_tree, "train": str(folder)}, [teacher("a", "resnet")], student(),
                         trainer={"max_epochs": 2, "limit_val_batches": 0})
    cli = main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step == 6  # every batch trained, on the 20 readable images
    assert cli.datamodule.skipped_total == 4  # read in both epochs, counted once
    assert cli.trainer.callback_metrics["data/skipped"] == 4


def test_a_batch_of_one_image_skips_the_step_and_under_ddp_every_process_skips_it():
    from types import SimpleNamespace

    model = AmalgamationModule([teacher("a", "resnet"), teacher("b", "vit")], student(), block_width=8,
                               block_depth=1)
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    folder = SimpleNamespace(skipped_total=7)  # a data module that drops unreadable files
    one, four = torch.rand(1, 3, 32, 32), torch.rand(4, 3, 32, 32)
    model.trainer = SimpleNamespace(world_size=1, datamodule=folder, training=True, current_epoch=0)
    assert model.training_step(one, 0) is None and model.training_step(one, 1) is None
    model.trainer.current_epoch = 1  # the count is per epoch, whatever hooks a subclass overrides
    assert model.training_step(one, 0) is None and model._skipped_steps == (1, 1)
    # Under DDP the decision is shared: a process with 4 good images skips too when another has too few,
    # since the others would wait for it in the step's all-reduces. Every process still runs backward.
    decisions = []

    def reduce_boolean_decision(decision, all):  # Lightning's argument names
        decisions.append((decision, all))
        return True  # some process has fewer than 2 images

    model.trainer = SimpleNamespace(world_size=2, datamodule=folder, training=True, current_epoch=0,
                                    strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
    for images in (one, four):
        loss = model.training_step(images, 0)
        assert loss.item() == 0.0
        model.zero_grad()
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)
    assert decisions == [(True, False), (False, False)]


def test_a_batch_size_of_one_or_an_epoch_of_skipped_steps_is_an_error_not_a_silent_no_op(tmp_path, image_tree,
                                                                                          capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(), trainer={"max_epochs": 1})
    code, err = run_entry(["fit", "--config", str(cfg), "--data.batch_size", "1"], capsys)
    assert code == 1 and "data.batch_size is 1" in err and "set it >= 2" in err and "Traceback" not in err
    # One readable image in the folder: every batch has fewer than 2, so no step trains.
    folder = tmp_path / "one"
    write_png(folder / "only.png", np.random.default_rng(0), (40, 40))
    (folder / "broken.png").write_text("not an image")
    cfg = amalgam_config(tmp_path, {**image_tree, "train": str(folder)}, [teacher("a", "resnet")], student(),
                         trainer={"max_epochs": 1, "limit_val_batches": 0})
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 1 and "no training step ran in epoch 0" in err and "fewer than 2 readable images" in err


def test_an_evaluation_or_predict_batch_of_unreadable_files_only_is_passed_over(tmp_path, image_tree):
    folders = {}
    for task, eval_dir in image_tree["eval"].items():  # every class folder gains an unreadable file
        folders[task] = tmp_path / "eval" / task
        for png in Path(eval_dir).rglob("*.png"):
            (folders[task] / png.relative_to(eval_dir)).parent.mkdir(parents=True, exist_ok=True)
            (folders[task] / png.relative_to(eval_dir)).write_bytes(png.read_bytes())
        for name in os.listdir(eval_dir):
            (folders[task] / name / "zz_broken.png").write_text("not an image")
    cfg = amalgam_config(tmp_path, {**image_tree, "eval": {k: str(v) for k, v in folders.items()}},
                         [teacher("a", "resnet"), teacher("b", "vit")], student(), trainer={"max_epochs": 1})
    cli = main(["validate", "--config", str(cfg), "--data.eval_batch_size", "1",
                "--data.predict_dir", str(folders["a"])])
    # The broken files are batches of their own at batch size 1: the accuracy counts the readable images.
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.datamodule.skipped_total > 0 and 0.0 <= metrics["val/acc_union"] <= 1.0
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert sum(len(p["union_top"]) for p in predictions) == len(list(Path(folders["a"]).rglob("[0-9].png")))
    assert any(len(p["union_top"]) == 0 for p in predictions)


def test_validate_without_labelled_folders_says_what_to_give(tmp_path, image_tree, capsys):
    cfg = amalgam_config(tmp_path, {**image_tree, "eval": {}}, [teacher("a", "resnet")], student())
    code, err = run_entry(["validate", "--config", str(cfg)], capsys)
    assert code == 1 and "nothing to validate" in err and "eval_dirs" in err and "Traceback" not in err


def test_under_ddp_every_process_computes_a_metric_that_any_process_updated():
    """A process whose evaluation images were all unreadable still joins compute()'s gather."""
    from types import SimpleNamespace

    model = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1)
    logged, decisions = [], []
    model.log = lambda name, value, **kwargs: logged.append(name)

    def reduce_boolean_decision(decision, all):
        decisions.append(decision)
        return True  # another process has data

    model.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute() before update() on this process
        model._log_eval("val")
    assert decisions and not any(decisions)  # nothing was updated here
    assert "val/acc_union" in logged and "val" in model.confusion


def test_small_map_convolutions_take_an_empty_batch():
    net = TappedNetwork(TINY["student"]["arch"], 3, ["pooled"], input_size=32,
                        model_kwargs=TINY["student"]["model_kwargs"])
    assert net(torch.rand(0, 3, 32, 32)).logits.shape == (0, 3)


def test_an_endless_run_with_a_decaying_schedule_says_what_to_set(tmp_path, image_tree, capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(), trainer={"max_epochs": -1})
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 1 and "model.scheduler: cosine" in err and "set trainer.max_epochs or trainer.max_steps" in err
    assert "Traceback" not in err


def test_a_nan_on_one_ddp_process_stops_every_process():
    from types import SimpleNamespace

    model = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1)
    decisions = []

    def reduce_boolean_decision(decision, all):  # Lightning's argument names
        decisions.append((decision, all))
        return False  # another process's loss is NaN

    model.trainer = SimpleNamespace(world_size=2, global_step=7, current_epoch=0,
                                    strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
    finite = {"kd": torch.tensor(1.0)}
    with pytest.raises(FloatingPointError, match=r"\['\(on another process\)'\] became NaN/Inf at step 7"):
        model._check_finite(finite, torch.tensor(1.0))
    assert decisions == [(True, True)]


@pytest.mark.parametrize("workers", [0, 1])  # a worker's error arrives wrapped in its traceback: unwrapped
def test_strict_mode_stops_naming_the_file(workers, tmp_path, image_tree, capsys):
    folder = bad_image_folder(tmp_path / "train")
    cfg = amalgam_config(tmp_path, {**image_tree, "train": str(folder)}, [teacher("a", "resnet")], student(),
                         trainer={"max_epochs": 1, "limit_val_batches": 0})
    code, err = run_entry(["fit", "--config", str(cfg), "--data.init_args.strict", "true",
                           "--data.init_args.num_workers", str(workers)], capsys)
    assert code == 1 and "Traceback" not in err
    assert "strict=True" in err and any(name in err for name in ("corrupt.png", "truncated.png", "empty.jpg",
                                                                  "notes.jpg"))


# --------------------------------------------------------------------------------------------------------
# Bad folders, checkpoints, taps: one readable line from the CLI


def _case(name: str, tmp_path: Path, image_tree: dict) -> tuple[list[dict], dict, list[str], str]:
    """(teachers, student, extra CLI args, expected message) of one bad input."""
    teachers, extra = [teacher("a", "resnet"), teacher("b", "vit")], []
    stud = student()
    if name == "missing train folder":
        extra, expected = ["--data.init_args.train_dir", str(tmp_path / "nowhere")], "does not exist"
    elif name == "empty train folder":
        (tmp_path / "empty").mkdir()
        extra, expected = ["--data.init_args.train_dir", str(tmp_path / "empty")], "holds no images"
    elif name == "folder without images":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "readme.txt").write_text("no pictures here")
        extra, expected = ["--data.init_args.train_dir", str(tmp_path / "docs")], "holds no images"
    elif name == "eval classes differ":
        rng = np.random.default_rng(0)
        for cls in ("cat", "cow"):
            write_png(tmp_path / "eval_a" / cls / "0.png", rng, (32, 32))
        extra = ["--data.init_args.eval_dirs", f"{{a: {tmp_path / 'eval_a'}}}"]
        expected = "missing folders: ['dog'], extra folders: ['cow']"
    elif name == "missing teacher checkpoint":
        teachers[0] = teacher("a", "resnet", checkpoint=str(tmp_path / "gone.safetensors"))
        expected = "gone.safetensors' does not exist"
    elif name == "unknown tap":
        teachers[0] = teacher("a", "resnet", taps=["layer9"])
        expected = "unknown tap 'layer9'. Valid taps: ['pooled', 'act1', 'layer1', 'layer2', 'layer3', 'layer4']"
    elif name == "maps cannot align":
        teachers[1] = teacher("b", "vit", taps=["blocks.0", "pooled"])
        expected = "teacher 'b' has taps ['blocks.0', 'pooled'] but the student has ['layer4']"
    else:
        raise AssertionError(name)
    return teachers, stud, extra, expected


@pytest.mark.parametrize("name", ["missing train folder", "empty train folder", "folder without images",
                                  "eval classes differ", "missing teacher checkpoint", "unknown tap",
                                  "maps cannot align"])
def test_bad_input_reaches_the_user_as_one_message(name, tmp_path, image_tree, capsys):
    teachers, stud, extra, expected = _case(name, tmp_path, image_tree)
    cfg = amalgam_config(tmp_path, image_tree, teachers, stud, trainer={"max_steps": 1, "limit_val_batches": 1})
    code, err = run_entry(["fit", "--config", str(cfg), *extra], capsys)
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("amalgam: error: ")
    assert expected in err


def test_config_typo_in_a_subprocess_names_the_key_without_traceback(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student())
    config = yaml.safe_load(cfg.read_text())
    config["model"]["init_args"]["teachers"][0]["chekpoint"] = "a.safetensors"  # typo inside a teacher entry
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(bad)], capture_output=True,
                         text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert "chekpoint" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("edit", "key"), [
    (lambda c: c["model"]["init_args"].update(block_widht=8), "block_widht"),
    (lambda c: c["model"]["init_args"].update(block_width="eight"), "block_width"),
    (lambda c: c["model"]["init_args"]["student"].update(input_sise=32), "input_sise"),
], ids=["typo", "wrong-type", "typo-in-student"])
def test_config_errors_are_jsonargparse_messages(edit, key, tmp_path, image_tree, capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student())
    config = yaml.safe_load(cfg.read_text())
    edit(config)
    cfg.write_text(yaml.safe_dump(config))
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 2 and key in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------
# Teacher checkpoints: every mismatch named


def _resnet_state(num_classes: int = 2) -> dict[str, torch.Tensor]:
    spec = TINY["resnet"]
    return TappedNetwork(spec["arch"], num_classes, [], model_kwargs=spec["model_kwargs"]).model.state_dict()


@pytest.mark.parametrize("case", ["missing", "wrong-arch", "head-size", "missing-key", "unexpected-key"])
def test_teacher_checkpoint_errors_name_teacher_and_sizes(case, tmp_path):
    path = tmp_path / "teacher_a.safetensors"
    state = _resnet_state()
    if case == "wrong-arch":
        spec = TINY["convnext"]
        state = TappedNetwork(spec["arch"], 2, [], model_kwargs=spec["model_kwargs"]).model.state_dict()
        expected = "keys are in it: is it the right architecture (arch, model_kwargs)?"
    elif case == "head-size":
        state = _resnet_state(num_classes=3)
        expected = "teacher 'a': the checkpoint's head has 3 outputs but 2 class names were given"
    elif case == "missing-key":
        state.pop("layer1.0.conv1.weight")
        expected = "missing keys ['layer1.0.conv1.weight']"
    elif case == "unexpected-key":
        state["extra.weight"] = torch.zeros(3)
        expected = "unexpected keys ['extra.weight']"
    else:
        expected = "teacher_a.safetensors' does not exist"
    if case != "missing":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        Teacher(**teacher("a", "resnet", checkpoint=str(path)))
    assert expected in str(info.value) and "teacher 'a'" in str(info.value)


def test_teacher_checkpoints_as_other_tools_write_them_load(tmp_path):
    spec = teacher("a", "resnet")
    state = _resnet_state()
    images = torch.rand(2, 3, 32, 32)
    expected = Teacher(**spec, checkpoint=_saved(state, tmp_path / "plain.pth"))(images).logits
    # Older or converted files have no BatchNorm step counters, and a hub blob has no file extension.
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    blob = tmp_path / "blobs" / "0f3a9c"
    blob.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, blob)
    for path in (_saved(no_counters, tmp_path / "old.pth"), str(blob)):
        torch.testing.assert_close(Teacher(**spec, checkpoint=path)(images).logits, expected)
    # A model and its EMA copy: which one to load is not guessed.
    both = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema_model.{k}": v * 0 for k, v in state.items()}}
    path = _saved({"state_dict": both}, tmp_path / "ema.ckpt")
    with pytest.raises(ValueError, match=r"teacher 'a': .*several prefixes \['ema_model\.', 'model\.'\].*"
                                         r"checkpoint_prefix"):
        Teacher(**spec, checkpoint=path)
    chosen = Teacher.from_config({**spec, "checkpoint": path, "checkpoint_prefix": "model."})
    torch.testing.assert_close(chosen(images).logits, expected)
    with pytest.raises(ValueError, match="no key of the checkpoint starts with 'net.'"):
        Teacher(**spec, checkpoint=path, checkpoint_prefix="net.")


def _saved(obj: dict, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def test_a_teacher_adopts_only_amalgam_s_own_saved_preprocessing(tmp_path):
    spec = teacher("a", "resnet")
    spec.pop("input_size")
    # Another project's hyper-parameters with timm's [3, H, W] input_size: not read as a size.
    other = _saved({"state_dict": _resnet_state(), "hyper_parameters": {"input_size": [3, 24, 24],
                                                                        "mean": "imagenet"}}, tmp_path / "o.ckpt")
    net = Teacher(**spec, checkpoint=other).net
    size, mean, _ = default_preprocessing(net.model)  # the timm defaults
    assert net.input_size == size != 24 and net.mean.flatten().tolist() == pytest.approx(list(mean))
    # An amalgamation checkpoint's student, used as a teacher, keeps the student's preprocessing.
    hparams = {"teachers": [], "student": {"arch": spec["arch"], "input_size": 24, "mean": [0.2] * 3,
                                           "std": [0.3] * 3}}
    state = {f"student.model.{k}": v for k, v in _resnet_state().items()}
    net = Teacher(**spec, checkpoint=_saved({"state_dict": state, "hyper_parameters": hparams},
                                            tmp_path / "s.ckpt")).net
    assert net.input_size == 24 and net.mean.flatten().tolist() == pytest.approx([0.2] * 3)


def test_a_teacher_without_weights_is_named(tmp_path):
    with pytest.warns(UserWarning, match="teacher 'a' has no checkpoint: its weights are random"):
        Teacher(**teacher("a", "resnet"))
    with pytest.raises(ValueError, match="teacher 'a': 'checkpoint' is an empty string"):
        Teacher(**teacher("a", "resnet", checkpoint=" "))


def test_a_vit_teacher_built_for_another_size_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"does not run on 64x64 inputs .*model_kwargs: img_size"):
        AmalgamationModule([teacher("b", "vit", input_size=64)], student())


# --------------------------------------------------------------------------------------------------------
# Diverging losses: the run stops with the term and the step; the last good checkpoint survives


class NaNAtStep(AmalgamationModule):
    """A run whose MMD term turns NaN at step 3 (stands in for any divergence)."""

    def loss_terms(self, student, teachers, common):
        terms = super().loss_terms(student, teachers, common)
        if self.global_step == 3:
            terms["mmd"] = terms["mmd"] * float("nan")
        return terms


class PoisonWeightsAt(L.Callback):
    """Turns one student weight into Inf after step ``step``, before the checkpoint of that step is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.student.parameters()).view(-1)[0] = float("inf")


def _every_step_checkpoint(dirpath: Path) -> dict:
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(dirpath), "every_n_train_steps": 1, "save_last": True, "save_top_k": 0}}


def _assert_finite_checkpoint(path: Path, step: int) -> dict:
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    return ckpt


def test_nan_loss_names_term_and_step_and_last_checkpoint_stays_good(tmp_path, image_tree, capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 6, "limit_val_batches": 0, "enable_checkpointing": True,
                                  "callbacks": [_every_step_checkpoint(tmp_path / "ckpt")]},
                         model_class=f"{__name__}.NaNAtStep")
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 1 and "Traceback" not in err
    assert "loss term(s) ['mmd'] became NaN/Inf at step 3" in err
    ckpt = _assert_finite_checkpoint(tmp_path / "ckpt" / "last.ckpt", step=3)
    reloaded = AmalgamationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert torch.equal(reloaded.student.state_dict()["model.fc.weight"], ckpt["state_dict"]["student.model.fc.weight"])


def test_broken_weights_never_overwrite_the_last_good_checkpoint(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(),
                         trainer={"max_steps": 6, "limit_val_batches": 0, "enable_checkpointing": True,
                                  "callbacks": [_every_step_checkpoint(tmp_path / "ckpt")]})
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.callbacks.insert(0, PoisonWeightsAt(step=2))
    with pytest.raises(FloatingPointError, match=r"weights \['student\.model\.conv1\.weight'\] became NaN/Inf by step 2"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    _assert_finite_checkpoint(tmp_path / "ckpt" / "last.ckpt", step=1)


# --------------------------------------------------------------------------------------------------------
# Security: planted pickles are refused and never run


class Payload:
    """What a malicious checkpoint carries: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused_everywhere_and_never_run(tmp_path, image_tree, capsys):
    marker = tmp_path / "PWNED"
    state = {k: v for k, v in _resnet_state().items()}
    evil_weights = tmp_path / "teacher.pth"
    torch.save({**state, "x": Payload(marker)}, evil_weights)
    evil_ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"student": {}, "teachers": []}, "x": Payload(marker)},
               evil_ckpt)

    with pytest.raises(ValueError, match="Refused to load .*teacher.pth.*posix.system.*running pickled code"):
        read_state_dict(evil_weights)

    # As a teacher checkpoint in a config, as --ckpt_path to resume from, as the checkpoint to export:
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet", checkpoint=str(evil_weights))], student())
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 1 and "Refused to load" in err and "Traceback" not in err
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(), trainer={"max_steps": 1})
    code, err = run_entry(["fit", "--config", str(cfg), "--ckpt_path", str(evil_ckpt)], capsys)
    assert code == 1 and "Refused to load checkpoint" in err and "posix.system" in err and "Traceback" not in err
    code, err = run_entry(["export", "--ckpt", str(evil_ckpt), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "Refused to load checkpoint" in err
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        AmalgamationModule.load_from_checkpoint(evil_ckpt)
    assert not marker.exists(), "a planted pickle ran"


def test_weights_only_false_resumes_from_a_trusted_checkpoint_that_holds_objects(tmp_path, image_tree, capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(),
                         trainer={"max_steps": 1, "limit_val_batches": 0, "enable_checkpointing": True,
                                  "callbacks": [_every_step_checkpoint(tmp_path / "ckpt")]})
    assert run_entry(["fit", "--config", str(cfg)], capsys)[0] == 0
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    ckpt["notes"] = argparse.Namespace(owner="me")  # a plain object: weights_only=True will not read it
    trusted = tmp_path / "trusted.ckpt"
    torch.save(ckpt, trusted)
    more = ["--trainer.max_steps", "2", "--ckpt_path", str(trusted)]
    code, err = run_entry(["fit", "--config", str(cfg), *more], capsys)
    assert code == 1 and "Refused to load checkpoint" in err and "--weights_only false" in err
    code, err = run_entry(["fit", "--config", str(cfg), *more, "--weights_only", "false"], capsys)
    assert code == 0, err
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    # Trusted, but pickling a class of a package that is not installed here: named as that, not as corrupt.
    (tmp_path / "gone_pkg.py").write_text("class Note:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_pkg

        ckpt["notes"] = gone_pkg.Note()
        torch.save(ckpt, trusted)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_pkg", None)
        (tmp_path / "gone_pkg.py").unlink()
    code, err = run_entry(["validate", "--config", str(cfg), "--ckpt_path", str(trusted), "--weights_only", "false"],
                          capsys)
    assert code == 1 and "pickles objects of code that cannot be loaded here (No module named 'gone_pkg')" in err


def test_a_config_that_builds_another_model_than_the_checkpoint_says_so_in_one_message(tmp_path, image_tree,
                                                                                       capsys):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(),
                         trainer={"max_steps": 1, "limit_val_batches": 0, "enable_checkpointing": True,
                                  "callbacks": [_every_step_checkpoint(tmp_path / "ckpt")]})
    assert run_entry(["fit", "--config", str(cfg)], capsys)[0] == 0
    code, err = run_entry(["validate", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--model.init_args.block_width", "16"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "the model this config builds differs from the one in the checkpoint (size mismatch for blocks.0" in err
    assert "config.yaml" in err


def test_truncated_checkpoints_are_named_as_broken_not_as_code(tmp_path, image_tree, capsys):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": _resnet_state(), "hyper_parameters": {}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:2000])  # what a copy interrupted half-way leaves
    with pytest.raises(ValueError, match="Cannot read checkpoint .*cut.ckpt.*truncated, corrupt"):
        read_state_dict(cut)
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet", checkpoint=str(cut))], student())
    code, err = run_entry(["fit", "--config", str(cfg)], capsys)
    assert code == 1 and "truncated, corrupt" in err and "Traceback" not in err
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(), trainer={"max_steps": 1})
    code, err = run_entry(["fit", "--config", str(cfg), "--ckpt_path", str(cut)], capsys)
    assert code == 1 and "truncated, corrupt" in err and "pickled code" not in err and "Traceback" not in err
    code, err = run_entry(["export", "--ckpt", str(cut), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "truncated, corrupt" in err and "pickled code" not in err


def test_garbage_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        read_state_dict(path)


def test_weights_are_read_past_a_modules_extra_state(tmp_path):
    # A run with the neighbour term saves its memory bank as extra state: its checkpoint still serves as weights.
    path = tmp_path / "run.ckpt"
    weight = torch.randn(3, 2)
    torch.save({"state_dict": {"student.w": weight, "neighbour_loss._extra_state": {"bank": None, "filled": 0}}},
               path)
    state = read_state_dict(path)
    assert state.keys() == {"student.w"} and torch.equal(state["student.w"], weight)


# --------------------------------------------------------------------------------------------------------
# Nothing lost: atomic checkpoint files, exact resume after a kill


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # bytes reach the disk, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    ckpt = io.load_checkpoint(path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"
    assert path.stat().st_mode & 0o044, "checkpoints must stay readable like any file the user writes"


def test_cli_wires_atomic_io_and_exact_resume_by_default(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student())
    trainer = main(["--config", str(cfg)], run=False).trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, ExactResume) for c in trainer.callbacks) == 1


def test_training_images_come_in_a_shuffled_order_that_changes_every_epoch(image_tree):
    from amalgam.data import ImageFolderDataModule

    data = ImageFolderDataModule(train_dir=image_tree["train"], image_size=32, batch_size=4, num_workers=0)
    sampler = data.train_dataloader().sampler  # folders are listed in sorted order: the sampler must mix them
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != list(range(24)) and second != first


def test_resumable_sampler_order_is_a_function_of_seed_and_epoch():
    def order(epoch, seed=0, **kw):
        sampler = ResumableSampler(10, seed=seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    assert sorted(order(3)) == list(range(10))
    sampler = ResumableSampler(10, seed=0)
    sampler.start_at(epoch=2, samples=4)
    assert list(sampler) == order(2)[4:] and len(sampler) == 10
    assert list(sampler) == order(2)  # the skip applies to one pass only
    shares = [order(0, num_replicas=2, rank=r) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(10))


def test_a_mid_epoch_resume_with_another_number_of_processes_says_the_epoch_is_not_exact():
    from types import SimpleNamespace

    def resumed(state: dict, world_size: int) -> None:
        callback = ExactResume()
        callback.load_state_dict(state)
        trainer = SimpleNamespace(world_size=world_size, global_rank=0, callbacks=[callback])
        ExactResume.sampler_for(trainer, dataset_size=20, batch_size=2)

    with pytest.warns(UserWarning, match="middle of epoch 1 with 1 process.*written by 2"):
        resumed({"epoch": 1, "batches_done": 3, "world_size": 2}, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed({"epoch": 1, "batches_done": 3, "world_size": 2}, world_size=2)  # same layout: exact
        resumed({"epoch": 1, "batches_done": 0, "world_size": 2}, world_size=1)  # at an epoch's start: exact
        resumed({"epoch": 1, "batches_done": 3}, world_size=1)  # a checkpoint that does not say


KILLER = textwrap.dedent("""
    import os, signal
    import lightning as L

    class KillAt(L.Callback):
        '''Sends the run a real signal at the start of a step: after the checkpoint of the step before.'''

        def __init__(self, step: int, sig: str = "SIGKILL") -> None:
            self.step, self.sig = step, sig

        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == self.step:
                os.kill(os.getpid(), getattr(signal, self.sig))
""")


def _resume_config(tmp_path: Path, image_tree: dict, name: str, kill: tuple[int, str] | None = None) -> Path:
    callbacks = [_every_step_checkpoint(tmp_path / name)]
    if kill:
        callbacks.append({"class_path": "killer.KillAt", "init_args": {"step": kill[0], "sig": kill[1]}})
    run_dir = tmp_path / f"{name}_cfg"
    run_dir.mkdir(exist_ok=True)
    # 24 images in batches of 8: 3 steps per epoch, 2 epochs; random crops and flips; validation each epoch.
    # The neighbour term's bank (12 entries: full and wrapping by step 2) is training state a resume must restore.
    neighbours = {"loss_weights": {"neighbour": 1.0}, "neighbour_bank_size": 12, "neighbour_k": 2}
    cfg = amalgam_config(run_dir, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         model_args=neighbours, trainer={"max_epochs": 2, "limit_val_batches": 1, "enable_checkpointing": True,
                                  "callbacks": callbacks})
    config = yaml.safe_load(cfg.read_text())
    config["data"]["init_args"].update(padding=4, flip=True)
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def _same(a, b) -> bool:
    """torch.equal, also through the plain dicts a module's extra state is saved as."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_tree) -> dict[str, torch.Tensor]:
    """Final weights of the run below, never interrupted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = main(["fit", "--config", str(_resume_config(root, image_tree, "full"))])
    torch.set_num_threads(threads)
    assert cli.trainer.global_step == 6
    return torch.load(root / "full" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize(("sig", "saved_step"), [("SIGKILL", 4), ("SIGTERM", 5)])
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(sig, saved_step, uninterrupted, tmp_path,
                                                            image_tree):
    (tmp_path / "killer.py").write_text(KILLER)
    # Killed at the start of step 4 (epoch 1, one of its three batches done). SIGKILL: nothing runs after it.
    # SIGTERM (pre-emption): Lightning finishes step 4, checkpoints it, and amalgam exits with status 143.
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    killed_cfg = _resume_config(tmp_path, image_tree, "run", kill=(4, sig))
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(killed_cfg)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 143), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    left = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert left["global_step"] == saved_step and left["epoch"] == 1  # mid-epoch
    assert left["callbacks"]["ExactResume"] == {"epoch": 1, "batches_done": saved_step - 3, "world_size": 1}

    cli = main(["fit", "--config", str(_resume_config(tmp_path, image_tree, "run")), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    resumed = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not _same(resumed[k], uninterrupted[k])]
    assert "neighbour_loss._extra_state" in resumed
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
