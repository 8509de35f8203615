"""Subclassing AmalgamationModule in one's own project, and reusing a run's checkpoint elsewhere, through the CLI."""

from __future__ import annotations

import shutil
from typing import ClassVar

import torch
import yaml
from conftest import SIZE, amalgam_config, student, teacher
from safetensors.torch import save_file

from amalgam import AmalgamationModule, load_student
from amalgam.backbones import TappedNetwork
from amalgam.cli import entry_point, main


class AuxHead(AmalgamationModule):
    """Adds a trainable module of its own and a loss term, with a weight set under model.loss_weights."""

    extra_loss_terms: ClassVar[dict[str, float]] = {"aux": 1.0}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.aux = torch.nn.Linear(self.num_classes, self.num_classes)

    def loss_terms(self, student, teachers, common):
        target = torch.cat([t.logits for t in teachers], 1)
        return super().loss_terms(student, teachers, common) | {"aux": (self.aux(student.logits) - target).pow(2).mean()}


class Unweighted(AmalgamationModule):
    def loss_terms(self, student, teachers, common):
        return super().loss_terms(student, teachers, common) | {"l2": student.logits.pow(2).mean()}


class SlicePreset(AmalgamationModule):
    """A project's preset: some base arguments fixed in code, the rest from YAML."""

    def __init__(self, teachers, student, **kwargs) -> None:
        super().__init__(teachers, student, kd="slice", temperature=4.0, scheduler="none", **kwargs)


class NamedStudent(AmalgamationModule):
    """Takes its own ``student`` (a name) and turns it into the base class's (a config)."""

    def __init__(self, teachers, student: str = "tiny", **kwargs) -> None:
        super().__init__(teachers, {"tiny": globals()["student"]()}[student], **kwargs)


def test_a_subclass_argument_named_like_a_base_argument_is_not_the_base_s():
    model = NamedStudent([teacher("a", "resnet")], "tiny", block_width=8, block_depth=1)
    assert model.hparams.student == "tiny" and model.init_args.student == student()
    assert model.init_args.block_width == 8


class FixedStudent(AmalgamationModule):
    """Builds its student itself: only a width comes from YAML."""

    def __init__(self, teachers, width: int = 8, **kwargs) -> None:
        super().__init__(teachers, {**student(), "model_kwargs": {"channels": [width, width, 16, 16]}}, **kwargs)


def _fit(tmp_path, image_tree, model_class: str, model_args: dict | None = None, steps: int = 2, **extra):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         model_args=model_args, model_class=f"{__name__}.{model_class}",
                         trainer={"max_steps": steps, "limit_val_batches": 0, **extra})
    config = yaml.safe_load(cfg.read_text())
    if model_class == "FixedStudent":
        del config["model"]["init_args"]["student"]
        cfg.write_text(yaml.safe_dump(config))
    return cfg


def test_a_subclass_s_own_module_and_loss_term_train_with_a_configurable_weight(tmp_path, image_tree):
    cfg = _fit(tmp_path, image_tree, "AuxHead", {"loss_weights": {"mmd": 1.0, "recon": 1.0, "aux": 0.5}})
    cli = main(["--config", str(cfg)], run=False)
    before = cli.model.aux.weight.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.loss_weights["aux"] == 0.5
    assert not torch.equal(before, cli.model.aux.weight)  # in the optimizer's "other" group
    groups = {g["name"]: g for g in cli.model.parameter_groups()}
    assert {id(p) for p in groups["other"]["params"]} == {id(p) for p in cli.model.aux.parameters()}
    terms = {"kd": torch.tensor(1.0), "mmd": torch.tensor(0.0), "recon": torch.tensor(0.0), "aux": torch.tensor(2.0)}
    assert cli.model.combine_losses(terms).item() == 1.0 + 0.5 * 2.0


def test_a_loss_term_without_a_weight_is_named(tmp_path, image_tree, capsys):
    cfg = _fit(tmp_path, image_tree, "Unweighted")
    code = entry_point(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 1 and "loss term(s) ['l2'] have no weight" in err and "extra_loss_terms" in err


def test_a_subclass_that_fixes_base_arguments_runs_and_reloads(tmp_path, image_tree):
    cfg = _fit(tmp_path, image_tree, "SlicePreset", enable_checkpointing=True)
    cli = main(["fit", "--config", str(cfg)])
    assert cli.model.init_args.scheduler == "none" and cli.model.init_args.kd == "slice" and cli.model.init_args.temperature == 4.0
    assert "scheduler" not in cli.model.hparams  # the saved arguments are the config's: the class reloads from them
    (ckpt,) = (tmp_path / "run").rglob("last.ckpt")
    again = main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
    assert again.trainer.global_step == 3 and again.model.init_args.temperature == 4.0
    # The subclass's checkpoint under a config naming the base class (spelt another way): the checkpoint's class
    # is built, and the arguments the user gave still outrank the saved ones.
    config = yaml.safe_load(cfg.read_text())
    config["model"]["class_path"] = "amalgam.module.AmalgamationModule"
    cfg.write_text(yaml.safe_dump(config))
    base = main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--model.init_args.evaluate_teachers",
                 "false", "--model.init_args.lr", "0.5"])
    assert type(base.model) is SlicePreset
    assert base.model.init_args.evaluate_teachers is False and base.model.init_args.lr == 0.5


def test_a_subclass_that_builds_its_student_exports(tmp_path, image_tree, capsys):
    cfg = _fit(tmp_path, image_tree, "FixedStudent", {"width": 6}, enable_checkpointing=True)
    config = yaml.safe_load(cfg.read_text())
    del config["data"]["init_args"]["image_size"]  # read at the networks' size, which the export records
    cfg.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(cfg)])
    (ckpt,) = (tmp_path / "run").rglob("last.ckpt")
    assert entry_point(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "student")]) == 0, \
        capsys.readouterr().err
    exported = load_student(tmp_path / "student")
    assert exported.config["preprocessing"]["image_size"] == SIZE == exported.image_size
    images = torch.rand(3, 3, SIZE, SIZE)
    cli.model.eval()
    torch.testing.assert_close(exported(images), cli.model(images))


def test_a_run_without_checkpoint_callbacks_keeps_a_last_checkpoint(tmp_path, image_tree):
    cfg = _fit(tmp_path, image_tree, "SlicePreset", enable_checkpointing=True)
    main(["fit", "--config", str(cfg)])
    assert len(list((tmp_path / "run").rglob("last.ckpt"))) == 1


def test_the_config_outranks_the_hyper_parameters_a_checkpoint_saved(tmp_path, image_tree):
    """A run's checkpoint evaluated elsewhere: the teachers have moved, and the user turns a flag off."""
    weights = {}
    for task, family in (("a", "resnet"), ("b", "vit")):
        spec = teacher(task, family)
        net = TappedNetwork(spec["arch"], len(spec["classes"]), [], model_kwargs=spec["model_kwargs"]).model
        weights[task] = tmp_path / "old" / f"{task}.safetensors"
        weights[task].parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights[task])
    teachers = [teacher("a", "resnet", checkpoint=str(weights["a"])), teacher("b", "vit", checkpoint=str(weights["b"]))]
    cfg = amalgam_config(tmp_path, image_tree, teachers, student(),
                         model_args={"loss_weights": {"mmd": 1.0, "recon": 1.0, "entropy": 0.3}},
                         trainer={"max_steps": 1, "limit_val_batches": 0, "enable_checkpointing": True})
    main(["fit", "--config", str(cfg)])
    (ckpt,) = (tmp_path / "run").rglob("last.ckpt")
    shutil.move(tmp_path / "old", tmp_path / "new")
    config = yaml.safe_load(cfg.read_text())
    for entry in config["model"]["init_args"]["teachers"]:
        entry["checkpoint"] = entry["checkpoint"].replace("/old/", "/new/")
    cfg.write_text(yaml.safe_dump(config))
    cli = main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--model.init_args.evaluate_teachers", "false"])
    assert [t["checkpoint"] for t in cli.model.init_args.teachers] == [str(tmp_path / "new" / f"{t}.safetensors")
                                                                  for t in "ab"]
    metrics = cli.trainer.callback_metrics
    assert "test/a/acc" in metrics and not any("teacher" in k for k in metrics)
    # What the config leaves out still comes from the checkpoint: here block_width (8 there, 128 by default)
    # and the loss weights, of which a dotted key changes one.
    del config["model"]["init_args"]["block_width"], config["model"]["init_args"]["loss_weights"]
    cfg.write_text(yaml.safe_dump(config))
    cli = main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--model.init_args.loss_weights.selflabel",
                "0.5"])
    assert cli.model.init_args.block_width == 8  # and the checkpoint's weights fit its blocks
    assert {k: cli.model.loss_weights[k] for k in ("mmd", "recon", "entropy", "selflabel")} == {
        "mmd": 1.0, "recon": 1.0, "entropy": 0.3, "selflabel": 0.5}


def test_a_learning_rate_set_in_hparams_after_init_reaches_the_optimizer():
    model = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1, lr=1e-3)
    model.hparams.lr = 0.25  # what Lightning's learning-rate finder does with its suggestion
    assert {g["lr"] for g in model.parameter_groups()} == {0.25}


def test_a_config_with_its_own_checkpoint_callback_gets_no_second_one(tmp_path, image_tree):
    callback = {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "crash")}}
    cfg = _fit(tmp_path, image_tree, "SlicePreset", enable_checkpointing=True, callbacks=[callback])
    trainer = main(["--config", str(cfg)], run=False).trainer
    assert [type(c).__name__ for c in trainer.checkpoint_callbacks] == ["OnExceptionCheckpoint"]
