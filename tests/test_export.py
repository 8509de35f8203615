"""The student after training: exported alone, reloaded without Lightning or teachers, predicting, as ONNX."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import SIZE, TASK_CLASSES, amalgam_config, student, teacher, write_png
from lightning.pytorch import LightningModule
from safetensors.torch import load_file

from amalgam import AmalgamationModule, Student, export_student, load_student
from amalgam.cli import entry_point, main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_tree) -> dict:
    """A 2-step amalgamation run (ResNet + ViT teachers, ResNet student), its checkpoint and its export."""
    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = amalgam_config(root, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 2, "limit_val_batches": 0})
    cli = main(["fit", "--config", str(cfg)])
    ckpt = root / "student.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    torch.set_num_threads(threads)
    return {"root": root, "config": cfg, "ckpt": ckpt, "export": export_student(ckpt, root / "export")}


def test_export_cli_writes_the_student_alone(trained, tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.onnx").write_bytes(b"an earlier export's graph")
    out = subprocess.run([sys.executable, "-m", "amalgam", "export", "--ckpt", str(trained["ckpt"]), "--out",
                          str(tmp_path / "student")], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {p.name for p in (tmp_path / "student").iterdir()} == {"config.json", "model.safetensors"}

    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["num_classes"] == 5
    assert config["tasks"] == [{"name": "a", "classes": TASK_CLASSES["a"], "slice": [0, 2]},
                               {"name": "b", "classes": TASK_CLASSES["b"], "slice": [2, 5]}]
    pre = config["preprocessing"]
    assert pre["input_size"] == SIZE and pre["image_size"] == SIZE
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]  # timm's resnet defaults

    # Only the student's own weights: no teacher, no common-feature block, no optimizer state.
    weights = load_file(str(tmp_path / "student" / "model.safetensors"))
    plain = timm.create_model("resnet18", num_classes=5, **config["model_kwargs"])
    assert weights.keys() == plain.state_dict().keys()
    assert (tmp_path / "student" / "model.safetensors").stat().st_mode & 0o044  # readable like any output


def test_reloaded_student_matches_the_trained_module_with_or_without_amalgam(trained):
    exported = load_student(trained["export"])
    assert isinstance(exported, Student) and not isinstance(exported, LightningModule)
    assert not exported.training

    module = AmalgamationModule.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    images = torch.rand(4, 3, SIZE + 8, SIZE + 8)  # any size: both resize to the student's input size
    with torch.no_grad():
        expected = module(images)
        torch.testing.assert_close(exported(images), expected, rtol=0, atol=0)

        # The same weights in a plain timm model, preprocessing done by hand from config.json.
        config = exported.config
        plain = timm.create_model(config["arch"], num_classes=config["num_classes"], **config["model_kwargs"])
        plain.load_state_dict(load_file(str(trained["export"] / "model.safetensors")))
        mean = torch.tensor(config["preprocessing"]["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(config["preprocessing"]["std"]).view(1, 3, 1, 1)
        size = config["preprocessing"]["input_size"]
        resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        torch.testing.assert_close(plain.eval()((resized - mean) / std), expected)

        # uint8 pixels, as torchvision.io.read_image gives them, are the same picture.
        pixels = (images * 255).round().to(torch.uint8)
        torch.testing.assert_close(exported(pixels), exported(pixels.float() / 255), rtol=0, atol=0)

    predictions = exported.predict(images)
    for row, logits in zip(predictions, expected):
        assert row["tasks"]["a"]["class"] == TASK_CLASSES["a"][int(logits[:2].argmax())]
        assert row["tasks"]["b"]["class"] == TASK_CLASSES["b"][int(logits[2:].argmax())]
        assert 0 < row["tasks"]["b"]["prob"] <= 1
        top = int(logits.argmax())
        assert (row["union"]["task"], row["union"]["class"]) == (
            ("a", TASK_CLASSES["a"][top]) if top < 2 else ("b", TASK_CLASSES["b"][top - 2]))


def _predict_folder(root: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    # The last name is not valid UTF-8 (Latin-1 "café"): it is written back as its own bytes.
    paths = [root / f"img{i}.png" for i in range(4)] + [root / os.fsdecode(b"caf\xe9.png")]
    for path in paths:
        write_png(path, rng, (48, 40))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return paths


@pytest.mark.parametrize("output", ["preds.csv", "preds.jsonl"])
def test_predict_cli_streams_one_row_per_image(output, trained, tmp_path, capsys):
    good = _predict_folder(tmp_path / "photos")
    target = tmp_path / "out" / output
    code = entry_point(["predict", "--config", str(trained["config"]),
                        "--data.init_args.predict_dir", str(tmp_path / "photos"), "--data.init_args.batch_size", "2",
                        "--ckpt_path", str(trained["ckpt"]),
                        "--trainer.callbacks+", "amalgam.callbacks.PredictionWriter",
                        "--trainer.callbacks.output", str(target), "--trainer.callbacks.probabilities", "true"])
    assert code == 0, capsys.readouterr().err[-3000:]

    # The rows agree with the exported student reading the same files: export and predict are one model.
    expected = {r["image"]: r for r in load_student(trained["export"]).predict_files(good)}
    if output.endswith(".csv"):
        with target.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0])[:7] == ["image", "union_task", "union_class", "a", "a_prob", "a/cat", "a/dog"]
        got = {r["image"]: (r["union_task"], r["union_class"], r["a"], r["b"]) for r in rows}
    else:
        rows = [json.loads(line) for line in target.read_text().splitlines()]
        assert set(rows[0]["tasks"]["b"]["probs"]) == set(TASK_CLASSES["b"])
        got = {r["image"]: (r["union"]["task"], r["union"]["class"], r["tasks"]["a"]["class"],
                            r["tasks"]["b"]["class"]) for r in rows}
    assert len(rows) == len(good)  # the broken file is skipped, not written
    assert got == {image: (r["union"]["task"], r["union"]["class"], r["tasks"]["a"]["class"],
                           r["tasks"]["b"]["class"]) for image, r in expected.items()}


def test_export_errors_say_what_is_wrong(trained, tmp_path, capsys):
    code = entry_point(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")])
    assert code == 1 and "none.ckpt' does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, plain)
    code = entry_point(["export", "--ckpt", str(plain), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "holds no AmalgamationModule hyper-parameters" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="is not an exported student"):
        load_student(tmp_path)


def test_onnx_export_without_its_packages_is_one_line(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    code = entry_point(["export", "--ckpt", str(trained["ckpt"]), "--out", str(tmp_path / "o"), "--onnx"])
    err = capsys.readouterr().err
    assert code == 1 and "pip install -e '.[onnx]'" in err and "Traceback" not in err


def test_onnx_export_matches_pytorch(trained, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="ONNX parity needs onnxruntime: pip install -e '.[onnx]'")
    from amalgam.export import export_onnx

    exported = load_student(trained["export"])
    path = export_onnx(exported, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, SIZE, SIZE)  # a batch size other than the export's: the batch axis is dynamic
    (onnx_logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, exported(images).numpy(), rtol=1e-4, atol=1e-5)


def test_an_exported_student_as_union_teacher_adds_its_union_soft_targets(trained, tmp_path, image_tree):
    teachers = [teacher("a", "resnet"), teacher("b", "vit")]
    module = AmalgamationModule(teachers, student(), temperature=2.0, union_teacher=str(trained["export"]),
                                loss_weights={"union_kd": 1.0})
    (union_teacher,) = module._union_teacher
    assert not any(p.requires_grad for p in union_teacher.parameters()) and not union_teacher.training
    assert not any(name.startswith("_union") for name in module.state_dict())  # outside the checkpointed tree
    images = torch.rand(4, 3, SIZE, SIZE)
    own = module.student_outputs(images)
    got = module.union_kd_term(images, own)
    # Naive reference: KL(earlier student || this student) of the union softmaxes at T=2, times T^2, per image.
    earlier = load_student(trained["export"])(images)
    expected = sum(
        (p * (p.log() - q.log())).sum()
        for p, q in zip((earlier / 2).softmax(1), (own.logits / 2).softmax(1))) / len(images) * 4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    got.backward()
    assert module.student.model.fc.weight.grad is not None

    with pytest.raises(ValueError, match="same tasks and classes"):
        AmalgamationModule(teachers[::-1], student(), union_teacher=str(trained["export"]))
    with pytest.raises(ValueError, match="set model.union_teacher"):
        AmalgamationModule(teachers, student(), loss_weights={"union_kd": 1.0})

    cfg = amalgam_config(tmp_path, image_tree, teachers, student(),
                         model_args={"union_teacher": str(trained["export"]), "loss_weights": {"union_kd": 1.0}},
                         trainer={"max_steps": 2, "limit_val_batches": 0})
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_union_kd"])
