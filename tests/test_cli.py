"""The real CLI on tiny YAML configs: heterogeneous teachers, map and vector taps, 2 and 3 teachers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TASK_CLASSES, amalgam_config, student, teacher

from amalgam.cli import main
from amalgam.visualize import CommonSpacePlot, ConfusionPlot


def run(args: list[str]):
    return main(args)


@pytest.mark.parametrize(
    ("teachers", "tap"),
    [
        ([("a", "resnet"), ("b", "vit")], "map"),
        ([("a", "resnet"), ("b", "vit"), ("c", "convnext")], "map"),
        ([("a", "resnet"), ("b", "swin"), ("c", "vit")], "vector"),
        ([("a", "convnext"), ("b", "vit")], None),
    ],
    ids=["resnet+vit-map", "resnet+vit+convnext-map", "resnet+swin+vit-vector", "kd-only"],
)
def test_fit_fast_dev_run_heterogeneous(tmp_path, image_tree, teachers, tap):
    cfg = amalgam_config(tmp_path, image_tree, [teacher(t, fam, tap) for t, fam in teachers], student(tap),
                         trainer={"fast_dev_run": 2})
    cli = run(["fit", "--config", str(cfg)])
    model = cli.model
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert len(model.blocks) == (0 if tap is None else 1)
    if tap:
        assert model.blocks[0].kind == ("map" if tap == "map" else "vector")
    metrics = cli.trainer.callback_metrics
    for name in ["train/loss", "train/loss_kd"] + ([] if tap is None else ["train/loss_mmd", "train/loss_recon"]):
        assert name in metrics and torch.isfinite(metrics[name])
    for task, _ in teachers:
        assert f"val/{task}/acc" in metrics
    assert "val/acc_union" in metrics and "val/teachers_concat/acc_union" in metrics


def test_two_taps_two_blocks_validate_and_test(tmp_path, image_tree):
    teachers = [teacher("a", "resnet", taps=["layer3", "pooled"]), teacher("b", "vit", taps=["blocks.0", "pooled"])]
    cfg = amalgam_config(tmp_path, image_tree, teachers, student(taps=["layer3", "pooled"]),
                         trainer={"fast_dev_run": 1})
    cli = run(["fit", "--config", str(cfg)])
    assert [b.kind for b in cli.model.blocks] == ["map", "vector"]
    for sub in ("validate", "test"):
        cli = run([sub, "--config", str(cfg)])
        prefix = "val" if sub == "validate" else "test"
        assert {f"{prefix}/a/acc", f"{prefix}/b/acc", f"{prefix}/acc_union"} <= set(cli.trainer.callback_metrics)
        # The union confusion of the same images: rows are true classes, its diagonal is the union accuracy.
        confusion = cli.model.confusion[prefix]
        assert confusion.shape == (5, 5) and confusion.sum() > 0
        assert confusion.diag().sum() / confusion.sum() == pytest.approx(
            cli.trainer.callback_metrics[f"{prefix}/acc_union"].item(), abs=1e-6)
        assert cli.model.union_classes == [("a", "cat"), ("a", "dog"), ("b", "car"), ("b", "bus"), ("b", "van")]



def test_confusion_plot_callback_draws_the_chosen_evaluations(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"fast_dev_run": 1})
    plot = ["--trainer.callbacks+", "amalgam.visualize.ConfusionPlot", "--trainer.callbacks.dirpath",
            str(tmp_path / "pics")]
    cli = run(["test", "--config", str(cfg), *plot])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, ConfusionPlot)]
    assert callback.path == tmp_path / "pics" / "confusion_test.png"
    assert (tmp_path / "pics" / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    run(["validate", "--config", str(cfg), *plot])  # "test" only by default
    assert not (tmp_path / "pics" / "confusion_val.png").exists()
    run(["validate", "--config", str(cfg), *plot, "--trainer.callbacks.stages", "[val]"])
    assert (tmp_path / "pics" / "confusion_val.png").exists()
    with pytest.raises(ValueError, match="'test' or 'val'"):
        ConfusionPlot(stages=["train"])


def test_common_space_plot_callback_draws_image_folder_runs(tmp_path, image_tree):
    only_b = {**image_tree, "eval": {"b": image_tree["eval"]["b"]}}  # the second teacher's task alone
    cfg = amalgam_config(tmp_path, only_b, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"fast_dev_run": 1})
    cli = run(["fit", "--config", str(cfg), "--trainer.callbacks+", "amalgam.visualize.CommonSpacePlot",
               "--trainer.callbacks.dirpath", str(tmp_path / "pics"), "--trainer.callbacks.method", "pca",
               "--trainer.callbacks.num_images", "4"])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, CommonSpacePlot)]
    assert callback.path == tmp_path / "pics" / "common_space.png"
    assert callback.path.read_bytes()[:4] == b"\x89PNG"
    # Colours follow the legend: labels index the evaluated classes, whatever slice of the head they hold.
    _, labels, names = callback._eval_images(cli.trainer, cli.model)
    assert names == TASK_CLASSES["b"] and 0 in labels and set(labels.tolist()) <= set(range(len(names)))


class LogDirCounter:
    """A trainer whose ``log_dir`` counts its readers: under DDP reading it is a collective (a broadcast)."""

    def __init__(self, rank: int, root: str) -> None:
        self.global_rank, self.default_root_dir, self.reads = rank, root, 0
        self.loggers, self.sanity_checking, self.datamodule = [], False, None

    @property
    def log_dir(self) -> str:
        self.reads += 1
        return self.default_root_dir


def test_plot_callbacks_read_the_log_dir_on_every_rank(tmp_path):
    """Rank 0 alone reading ``trainer.log_dir`` left it waiting in a broadcast the other ranks never joined."""
    from types import SimpleNamespace

    module = SimpleNamespace(confusion={"val": torch.tensor([[2, 1], [0, 3]])}, union_classes=[("a", "x"), ("b", "y")],
                             blocks=[object()])
    for rank in (0, 1):
        trainer = LogDirCounter(rank, str(tmp_path))
        ConfusionPlot(stages=["val"]).on_validation_end(trainer, module)
        CommonSpacePlot().on_fit_end(trainer, module)  # no labelled images here: draws nothing
        assert trainer.reads == 2, rank
    assert (tmp_path / "confusion_val.png").exists()


def test_confusion_plot_logs_the_picture_to_wandb(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="amalgam-test", save_dir=str(tmp_path))
    trainer = SimpleNamespace(global_rank=0, loggers=[logger], log_dir=None, default_root_dir=str(tmp_path))
    module = SimpleNamespace(confusion={"test": torch.tensor([[2, 1], [0, 3]])}, union_classes=[("a", "x"), ("b", "y")])
    try:
        ConfusionPlot().on_test_end(trainer, module)
        logger.experiment.finish()
    finally:
        # An in-process run leaves its W&B service's address in the environment, where later tests' `amalgam`
        # subprocesses would inherit it and hand their runs to this process's service.
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/test/confusion*.png"))
    assert media, "the confusion picture did not reach the W&B run"


def test_print_config_and_module_entry_point(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student())
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(cfg), "--print_config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "amalgam.AmalgamationModule" in out.stdout and "loss_weights" in out.stdout
    # A class's own help (built by jsonargparse from argv[0]) names the command, not __main__.py.
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--model.help", "amalgam.AmalgamationModule"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m amalgam --model.teachers"), out.stdout[:200]


def test_help_names_the_command_and_the_export_subcommand(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m amalgam") and "python -m amalgam export --ckpt" in out


def test_progress_bar_is_rich_in_a_terminal_and_tqdm_in_a_log_file(tmp_path, image_tree, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from amalgam.cli import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_bar(), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert isinstance(progress_bar(), TQDMProgressBar)
    # The real CLI writing to a pipe, as under SLURM or nohup: the epoch's progress is in the output.
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet")], student(),
                         trainer={"max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": True})
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Epoch 0: 100%" in out.stdout + out.stderr


def test_predict_returns_task_probabilities(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 1, "limit_val_batches": 0})
    fit = run(["fit", "--config", str(cfg)])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    # Without the run's checkpoint, predictions would come from the untrained student: refused, also when
    # `--ckpt_path last` finds none (Lightning then only warns).
    with pytest.raises(ValueError, match="predict without a checkpoint uses the model as built, untrained"):
        run(["predict", "--config", str(cfg), "--trainer.fast_dev_run", "1"])
    (tmp_path / "fresh").mkdir()
    fresh = amalgam_config(tmp_path / "fresh", image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student())
    with pytest.raises(ValueError, match="predict without a checkpoint"):
        run(["predict", "--config", str(fresh), "--ckpt_path", "last", "--trainer.limit_predict_batches", "1"])
    with pytest.warns(UserWarning, match="validate without a checkpoint"):
        run(["validate", "--config", str(cfg), "--trainer.fast_dev_run", "1"])
    cli = run(["predict", "--config", str(cfg), "--trainer.fast_dev_run", "1", "--ckpt_path", ckpt])
    preds = cli.trainer.predict_loop.predictions
    assert preds, "predict produced nothing"
    batch = preds[0]
    assert batch["probs/a"].shape[1] == 2 and batch["probs/b"].shape[1] == 3
    torch.testing.assert_close(batch["probs/b"].sum(1), torch.ones(len(batch["probs/b"])))


def test_ckpt_path_that_is_not_the_config_s_kind_of_run_is_refused(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student())
    # A plain state dict (a teacher's weights) is not a Lightning run's checkpoint.
    weights = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"not a checkpoint written by a Lightning run .*'conv.weight'"):
        run(["validate", "--config", str(cfg), "--ckpt_path", str(weights)])
    # A teacher's (Classifier's) checkpoint for an amalgamation config: named, not silently swapped in.
    from amalgam import Classifier

    classifier = Classifier(arch="resnet10t", classes=TASK_CLASSES["a"], task="a", input_size=32,
                            model_kwargs={"channels": [8, 8, 16, 16], "stem_width": 8})
    teacher_run = tmp_path / "teacher.ckpt"  # what `fit` of a teacher config writes (hyper-parameters included)
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": classifier.state_dict(),
                "hyper_parameters": {**classifier.hparams, "_class_path": "amalgam.Classifier",
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, teacher_run)
    with pytest.raises(ValueError, match=r"holds a amalgam.Classifier but the config's model is a .*AmalgamationModule"):
        run(["validate", "--config", str(cfg), "--ckpt_path", str(teacher_run)])


def test_a_teacher_predicts_through_the_same_writer(tmp_path, image_tree):
    import csv

    import yaml

    from amalgam import Classifier

    classifier = Classifier(arch="resnet10t", classes=TASK_CLASSES["b"], task="b", input_size=32,
                            model_kwargs={"channels": [8, 8, 16, 16], "stem_width": 8})
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": classifier.state_dict(),
                "hyper_parameters": {**classifier.hparams, "_class_path": "amalgam.Classifier"}}, ckpt)
    out = tmp_path / "predictions.csv"
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "amalgam.callbacks.PredictionWriter", "init_args": {"output": str(out)}}]},
        "model": {"class_path": "amalgam.Classifier", "init_args": dict(classifier.hparams)},
        "data": {"class_path": "amalgam.data.ImageFolderDataModule",
                 "init_args": {"train_dir": image_tree["train"], "batch_size": 5, "num_workers": 0}}}))
    run(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and list(rows[0]) == ["image", "union_task", "union_class", "b", "b_prob"]
    for row in rows:  # one task: its top class is the union's
        assert row["union_task"] == "b" and row["union_class"] == row["b"] in TASK_CLASSES["b"]
        assert 1 / 3 <= float(row["b_prob"]) <= 1
