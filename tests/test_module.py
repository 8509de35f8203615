"""AmalgamationModule contracts: frozen teachers, checkpoints without teachers, subclassing, DDP, W&B."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SIZE, amalgam_config, student, teacher
from safetensors.torch import save_file

from amalgam import AmalgamationModule, Teacher
from amalgam.backbones import Features, TappedNetwork
from amalgam.cli import main
from amalgam.data.augment import mix_images, strong_view

REPO = Path(__file__).resolve().parents[1]


class TeacherWatch(L.Callback):
    """Records, at every step, whether any teacher left eval mode or holds a gradient-enabled parameter."""

    def __init__(self) -> None:
        self.seen = []

    def _check(self, pl_module) -> None:
        for t in pl_module.teachers:
            self.seen.append((t.training, any(m.training for m in t.modules()),
                              any(p.requires_grad for p in t.parameters()), any(p.grad is not None for p in t.parameters())))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._check(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        self._check(pl_module)


def test_teachers_stay_frozen_and_out_of_optimizer_and_checkpoint(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 4, "limit_val_batches": 1, "val_check_interval": 2,
                                  "enable_checkpointing": True})
    watch = TeacherWatch()
    cli = main(["--config", str(cfg), "--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.save_last", "true",
                "--trainer.callbacks.filename", "student"], run=False)
    model = cli.model
    cli.trainer.callbacks.append(watch)
    teacher_before = {k: v.clone() for k, v in model.teachers[0].state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule, ckpt_path=None)
    assert watch.seen and not any(any(flags) for flags in watch.seen)
    for k, v in model.teachers[0].state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher tensor {k} changed during fit"

    optimizer = cli.trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for t in model.teachers for p in t.parameters())
    assert {g["name"] for g in optimizer.param_groups} == {"student", "head", "blocks"}

    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # no pickled objects in it
    assert last["state_dict"] and all(k.startswith(("student.", "blocks.")) for k in last["state_dict"])
    ckpt_path = tmp_path / "final.ckpt"
    cli.trainer.save_checkpoint(ckpt_path)

    reloaded = AmalgamationModule.load_from_checkpoint(ckpt_path, weights_only=True)
    assert [t.task for t in reloaded.teachers] == ["a", "b"]
    for k, v in model.student.state_dict().items():
        assert torch.equal(v, reloaded.student.state_dict()[k])
    images = torch.rand(4, 3, SIZE, SIZE)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(model(images), reloaded(images))


def test_teacher_checkpoints_in_every_format_load(tmp_path):
    spec = teacher("a", "resnet")
    source = TappedNetwork(spec["arch"], 2, [], model_kwargs=spec["model_kwargs"]).model
    state = source.state_dict()
    files = {"safetensors": tmp_path / "t.safetensors", "pth": tmp_path / "t.pth", "ckpt": tmp_path / "t.ckpt"}
    save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    torch.save(state, files["pth"])
    torch.save({"state_dict": {f"net.model.{k}": v for k, v in state.items()}, "epoch": 3}, files["ckpt"])
    images = torch.rand(2, 3, SIZE, SIZE)
    expected = source.eval()(TappedNetwork.preprocess(Teacher(**spec).net, images))
    for fmt, path in files.items():
        t = Teacher(**{**spec, "checkpoint": str(path)})
        torch.testing.assert_close(t(images).logits, expected, msg=f"{fmt} weights did not load")


def test_teacher_is_always_eval_and_outputs_are_autograd_safe():
    t = Teacher(**teacher("b", "vit"))
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    feats = t(torch.rand(2, 3, SIZE, SIZE))
    assert not feats.logits.requires_grad and not feats.logits.is_inference()
    assert feats.taps[0].shape[1:] == (16, 4, 4)  # ViT tokens came back as an NCHW map


def test_bf16_teachers_hand_float32_features_close_to_float32_teachers(tmp_path, image_tree):
    # Teacher a resizes its input: the antialiased resize has no bf16 kernel on CPU, so it runs before the cast.
    teachers = [teacher("a", "resnet", input_size=SIZE - 8), teacher("b", "vit")]
    images = torch.rand(4, 3, SIZE, SIZE)
    torch.manual_seed(0)
    full = AmalgamationModule(teachers, student())
    torch.manual_seed(0)
    half = AmalgamationModule(teachers, student(), teacher_dtype="bfloat16")
    for f, h in zip(full.teachers, half.teachers):
        assert all(p.dtype == torch.bfloat16 for p in h.parameters())
        expected, got = f(images), h(images)
        assert got.logits.dtype == torch.float32 and got.taps[0].dtype == torch.float32
        torch.testing.assert_close(got.logits, expected.logits, rtol=0.05, atol=0.05)
        torch.testing.assert_close(got.taps[0], expected.taps[0], rtol=0.05, atol=0.05)
    # The whole step runs with bf16 teachers and a float32 student, outside any autocast.
    cfg = amalgam_config(tmp_path, image_tree, teachers, student(), model_args={"teacher_dtype": "bfloat16"},
                         trainer={"max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2})
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/a/acc" in cli.trainer.callback_metrics
    with pytest.raises(ValueError, match="teacher_dtype must be one of"):
        AmalgamationModule(teachers, student(), teacher_dtype="int8")


def test_bf16_teacher_outputs_that_are_float32_already_are_still_copied_out_of_inference_mode():
    # Under CUDA autocast a bf16 teacher's layer norms return float32; those must not reach autograd as
    # inference tensors (a reconstruction loss would fail to save them for backward).
    t = Teacher(**teacher("b", "vit")).to(torch.bfloat16)
    t.net.register_forward_hook(lambda module, args, out: Features([x.float() for x in out.taps], out.logits.float()))
    feats = t(torch.rand(2, 3, SIZE, SIZE))
    assert not any(x.is_inference() for x in [*feats.taps, feats.logits])
    target = feats.taps[0]
    recon = torch.zeros_like(target, requires_grad=True)
    torch.nn.functional.mse_loss(recon, target).backward()  # what ReconstructionLoss does
    assert recon.grad is not None


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_low_precision_trainer_runs_every_term(tmp_path, image_tree, precision):
    """bf16 autocast, or the whole module in bf16 (teachers, blocks and student): on a GPU where there is one,
    where autocast refuses some losses (binary cross-entropy, the task gate's), else on the CPU."""
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    weights = {"balance": 1.0, "entropy": 0.1, "selflabel": 1.0, "task_gate": 0.1}
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet", input_size=SIZE - 8), teacher("b", "vit")],
                         student(), model_args={"loss_weights": weights},
                         trainer={"max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2,
                                  "accelerator": accelerator, "precision": precision})
    cli = main(["fit", "--config", str(cfg)])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and "val/acc_union" in metrics
    for term in ["kd", "mmd", "recon", "balance", "entropy", "selflabel", "task_gate", "task_gate_fit"]:
        assert torch.isfinite(metrics[f"train/loss_{term}"]), term
    # The module in bf16 keeps the MMD's bandwidths exact (the narrowest paper sigma's gamma is 5e5).
    gammas = cli.model.mmd_loss.gammas
    assert gammas.dtype == torch.float32 and gammas.max().item() == 5e5


@pytest.mark.parametrize("tap", ["map", "pooled"])
def test_teacher_flip_average_is_the_mean_of_a_view_and_its_mirror(tmp_path, image_tree, tap):
    teachers = [teacher("a", "resnet", tap=tap), teacher("b", "vit", tap=tap)]
    module = AmalgamationModule(teachers, student(tap=tap), teacher_flip_average=True)
    images = torch.rand(3, 3, SIZE, SIZE)
    averaged, mirrored_input = module.teacher_outputs(images), module.teacher_outputs(images.flip(-1))
    # A feature map of the mirrored view is flipped back before averaging; a pooled vector has no positions.
    unflip = (lambda m: m.flip(-1)) if tap == "map" else (lambda m: m)
    for t, out, out_mirror in zip(module.teachers, averaged, mirrored_input):
        plain, mirrored = t(images), t(images.flip(-1))
        assert out.taps[0].ndim == (4 if tap == "map" else 2)
        torch.testing.assert_close(out.logits, (plain.logits + mirrored.logits) / 2)
        torch.testing.assert_close(out.taps[0], (plain.taps[0] + unflip(mirrored.taps[0])) / 2)
        # Hence a view and its mirror image get the same targets.
        torch.testing.assert_close(out_mirror.logits, out.logits)
        torch.testing.assert_close(unflip(out_mirror.taps[0]), out.taps[0])
    assert not torch.allclose(averaged[0].logits, module.teachers[0](images).logits)
    cfg = amalgam_config(tmp_path, image_tree, teachers, student(tap=tap), model_args={"teacher_flip_average": True},
                         trainer={"max_steps": 2, "limit_val_batches": 0})
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(("option", "view"), [("mixup_alpha", lambda x: mix_images(x, 1.0)),
                                              ("shared_strong_view", strong_view)])
def test_mixup_and_strong_views_feed_teachers_and_student_the_same_view(tmp_path, image_tree, option, view):
    teachers = [teacher("a", "resnet"), teacher("b", "vit")]
    module = AmalgamationModule(teachers, student(), **{option: 1.0 if option == "mixup_alpha" else True})
    seen = {}

    def recording(name):
        original = getattr(module, name)

        def record(images):
            seen[name] = images
            return original(images)
        return record

    for name in ("teacher_outputs", "student_outputs"):
        setattr(module, name, recording(name))
    images = torch.rand(6, 3, SIZE, SIZE)
    torch.manual_seed(0)
    assert torch.isfinite(module.training_step(images, 0))
    assert torch.equal(seen["teacher_outputs"], seen["student_outputs"])
    assert not torch.allclose(seen["student_outputs"], images)
    torch.manual_seed(0)  # the view the step drew, drawn again
    torch.testing.assert_close(seen["student_outputs"], view(images))
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        AmalgamationModule(teachers, student(), mixup_alpha=-1.0)
    value = 0.5 if option == "mixup_alpha" else True
    cfg = amalgam_config(tmp_path, image_tree, teachers, student(), model_args={option: value},
                         trainer={"max_steps": 2, "limit_val_batches": 0})
    cli = main(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(("args", "message"), [
    ({"temperature": 0.0}, r"model.kd/temperature: KD temperature must be positive"),
    ({"mmd_bandwidths": []}, r"model.mmd_bandwidths: MMD bandwidths must be positive numbers, got \[\]"),
    ({"selflabel_threshold": 1.5}, r"model.selflabel_threshold: .* in \[0, 1\)"),
    ({"contrast_temperature": -1.0}, r"model.contrast_temperature: "),
    ({"loss_weights": {"neighbour": 1.0}, "neighbour_k": 0}, r"model.neighbour_bank_size/neighbour_k: "),
    ({"loss_weights": {"mmd": -1.0}}, r"model.loss_weights must be >= 0 \(0 turns a term off\), got \{'mmd': -1.0\}"),
    ({"lr": -0.1}, r"model.lr must be >= 0, got -0.1"),
    ({"block_lr": float("nan")}, r"model.block_lr must be >= 0, got nan"),
    ({"block_width": 0}, r"model.block_width must be >= 1 and model.block_depth >= 0, got 0 and 1"),
])
def test_bad_loss_settings_name_their_config_key(args, message):
    with pytest.raises(ValueError, match=message):
        AmalgamationModule([teacher("a", "resnet")], student(), **{"block_width": 8, "block_depth": 1, **args})


def test_teachers_sharing_a_class_name_are_told_it_stays_two_classes():
    with pytest.warns(UserWarning, match=r"more than one teacher has classes named \['cat'\]"):
        module = AmalgamationModule([teacher("a", "resnet", tap=None),
                                     teacher("b", "resnet", tap=None, classes=["cat", "bus", "van"])],
                                    student(tap=None))
    assert module.union_classes == [("a", "cat"), ("a", "dog"), ("b", "cat"), ("b", "bus"), ("b", "van")]


def test_bad_tap_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown tap 'layer9'.*layer4"):
        Teacher(**teacher("a", "resnet", taps=["layer9"]))


def test_common_feature_block_aligns_teacher_maps_to_the_student_grid_using_every_token():
    from amalgam.common_feature import CommonFeatureBlock

    torch.manual_seed(0)
    block = CommonFeatureBlock((8, 3, 3), [(6, 7, 7), (5, 2, 2)], width=4, depth=1, names=["vit", "cnn"])
    student_map = torch.randn(2, 8, 3, 3)
    vit = torch.randn(2, 6, 7, 7, requires_grad=True)  # 7x7 tokens shrunk to the student's 3x3
    cnn = torch.randn(2, 5, 2, 2)                       # 2x2 grown to 3x3
    out = block(student_map, [vit, cnn])
    assert out.student.shape == (2, 4, 3, 3) and [h.shape for h in out.teachers] == [(2, 4, 3, 3)] * 2
    assert [t.shape for t in out.targets] == [(2, 6, 3, 3), (2, 5, 3, 3)]
    assert [r.shape for r in out.reconstructions] == [(2, 6, 3, 3), (2, 5, 3, 3)]
    # Shrinking is antialiased: every one of the 49 tokens reaches the aligned target (plain bilinear reads 25).
    out.targets[0].sum().backward()
    assert (vit.grad != 0).all()
    assert torch.allclose(out.targets[0].mean((2, 3)), vit.mean((2, 3)), atol=0.2)
    # A map that shrinks along one side only (7 rows to 3, 2 columns to 8) is antialiased too.
    block = CommonFeatureBlock((8, 3, 8), [(6, 7, 2)], width=4, depth=1, names=["tall"])
    tall = torch.randn(2, 6, 7, 2, requires_grad=True)
    block(torch.randn(2, 8, 3, 8), [tall]).targets[0].sum().backward()
    assert (tall.grad != 0).all()


@pytest.mark.parametrize("shapes", [((8, 3, 3), [(6, 3, 3), (5, 3, 3)]), ((8,), [(6,), (5,)])], ids=["map", "vector"])
def test_common_space_terms_train_only_the_branches_the_method_says(shapes):
    """The networks pass through the block side by side: nothing may mix them (no batch statistics), so each
    term trains only its own branches, and a network's common features do not depend on the others'."""
    from amalgam.common_feature import CommonFeatureBlock

    torch.manual_seed(0)
    block = CommonFeatureBlock(shapes[0], shapes[1], width=4, depth=2).train()
    feats = [torch.randn(4, *shape) for shape in [shapes[0], *shapes[1]]]
    out = block(feats[0], feats[1:])

    def grads(loss):
        block.zero_grad()
        loss.backward(retain_graph=True)
        return [sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None)
                for m in (block.student_adapter, *block.teacher_adapters)]

    # Reconstruction of teacher 0 trains the extractor, teacher 0's adapter and decoder: not the student's
    # adapter, nor teacher 1's.
    student_a, teacher0_a, teacher1_a = grads(((out.reconstructions[0] - out.targets[0]) ** 2).mean())
    assert student_a == 0 and teacher1_a == 0 and teacher0_a > 0
    # The student-teacher 0 discrepancy leaves teacher 1's adapter alone.
    student_a, teacher0_a, teacher1_a = grads((out.student - out.teachers[0]).pow(2).mean())
    assert teacher1_a == 0 and student_a > 0 and teacher0_a > 0
    # Another student batch leaves the teachers' common features as they were.
    again = block(torch.randn_like(feats[0]), feats[1:])
    torch.testing.assert_close(again.teachers[0], out.teachers[0], rtol=0, atol=0)


def test_mismatched_tap_kinds_cannot_align():
    with pytest.raises(ValueError, match="Cannot align"):
        AmalgamationModule([teacher("a", "resnet", "vector"), teacher("b", "vit", "map")], student("map"))


def test_subclass_in_user_project_runs_by_class_path(tmp_path, image_tree):
    project = tmp_path / "userproj"
    project.mkdir()
    (project / "my_amalgam.py").write_text(textwrap.dedent("""
        import torch
        from amalgam import AmalgamationModule

        class HalfMMD(AmalgamationModule):
            '''A user's own loss combination, referenced from YAML by class_path.'''

            def combine_losses(self, terms):
                self.log("train/loss_custom", terms["mmd"].detach())
                return terms["kd"] + 0.5 * terms["mmd"]
    """))
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "convnext")], student(),
                         trainer={"fast_dev_run": 1}, model_class="my_amalgam.HalfMMD")
    env = {**os.environ, "PYTHONPATH": f"{project}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = ("import sys; from amalgam.cli import main; cli = main(sys.argv[1:]); "
              "print('MODEL', type(cli.model).__module__, type(cli.model).__name__); "
              "print('CUSTOM', 'train/loss_custom' in cli.trainer.callback_metrics)")
    out = subprocess.run([sys.executable, "-c", script, "fit", "--config", str(cfg)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MODEL my_amalgam HalfMMD" in out.stdout and "CUSTOM True" in out.stdout


def test_ddp_two_processes_on_cpu(tmp_path, image_tree):
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                                  "strategy": "ddp", "devices": 2, "enable_checkpointing": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(cfg)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in out.stderr + out.stdout or "distributed_backend=gloo" in out.stderr + out.stdout
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts, "DDP fit wrote no checkpoint"
    state = torch.load(ckpts[0], weights_only=True)["state_dict"]
    assert all(k.startswith(("student.", "blocks.")) for k in state)


def test_ddp_validation_scores_every_image_exactly_once(tmp_path, image_tree):
    """9 images of task b on 2 processes: Lightning's default sampler would score one of them twice."""
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"strategy": "ddp", "devices": 2})
    script = tmp_path / "validate.py"
    script.write_text("import sys\nfrom amalgam.cli import main\ncli = main(sys.argv[1:])\n"
                      "if cli.trainer.global_rank == 0:\n"
                      "    print('SCORED', int(cli.model.confusion['val'].sum()))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), "validate", "--config", str(cfg)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    images = sum(len(list(Path(image_tree["eval"][t]).rglob("*.png"))) for t in ("a", "b"))
    assert f"SCORED {images}" in out.stdout, out.stdout[-2000:]


def test_wandb_logger_preset_offline_records_config(tmp_path, image_tree, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], student(),
                         trainer={"max_steps": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0})
    out = subprocess.run([sys.executable, "-m", "amalgam", "fit", "--config", str(cfg), "--config",
                          str(REPO / "configs/loggers/wandb.yaml"), "--trainer.logger.init_args.save_dir",
                          str(tmp_path / "wb")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {tmp_path / 'wb'}"
    # The run's record holds the resolved hyper-parameters (teachers included) and the metrics.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"teachers" in record and b"train/loss" in record


def test_class_path_teacher_is_tapped_by_hooks(tmp_path, image_tree):
    plain = {"task": "c", "classes": ["oak", "elm"], "arch": "conftest.TinyNet", "model_kwargs": {"width": 6},
             "input_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match=r"unknown tap 'nope'.*features"):
        Teacher(**plain, taps=["nope"])
    t = Teacher(**plain, taps=["features", "pool"])
    feats = t(torch.rand(2, 3, SIZE, SIZE))
    assert [tuple(f.shape) for f in feats.taps] == [(2, 6, 8, 8), (2, 6)] and feats.logits.shape == (2, 2)
    # The default tap, "pooled", is what the head (its last Linear) reads: the same vector as its "pool".
    t = Teacher(**plain)
    images = torch.rand(2, 3, SIZE, SIZE)
    feats = t(images)
    assert [tuple(f.shape) for f in feats.taps] == [(2, 6)]
    torch.testing.assert_close(feats.logits, t.net.model.fc(feats.taps[0]))
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), {**plain, "taps": ["features"]}], student(),
                         trainer={"fast_dev_run": 1})
    cli = main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step == 1 and cli.model.blocks[0].kind == "map"


def test_class_path_student_trains_with_its_last_linear_as_the_head(tmp_path, image_tree):
    plain = {"arch": "conftest.TinyNet", "model_kwargs": {"width": 6}, "input_size": SIZE, "mean": [0.5] * 3,
             "std": [0.5] * 3, "taps": ["features"]}
    cfg = amalgam_config(tmp_path, image_tree, [teacher("a", "resnet"), teacher("b", "vit")], plain,
                         model_args={"head_lr": 0.01}, trainer={"fast_dev_run": 1})
    cli = main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step == 1
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    head = cli.model.student.model.fc
    assert [id(p) for p in groups["head"]["params"]] == [id(head.weight), id(head.bias)]
    assert groups["head"]["initial_lr"] == 0.01 and groups["student"]["initial_lr"] == cli.model.hparams.lr


def test_compile_mode_reaches_every_compiled_network(monkeypatch):
    modes = []
    eager = functools.partial(torch.compile, backend="eager")

    def recording_compile(fn, **kwargs):
        modes.append(kwargs.pop("mode", None))
        return eager(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = AmalgamationModule([teacher("a", "resnet"), teacher("b", "vit")], student(), block_width=8,
                               block_depth=1, compile=True, compile_mode="reduce-overhead")
    model.configure_model()
    assert modes == ["reduce-overhead"] * 4  # student, blocks, two teachers
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="model.compile_mode must be one of"):
        AmalgamationModule([teacher("a", "resnet")], student(), compile=True, compile_mode="fast")


def test_compiled_module_with_four_teacher_families_stays_under_dynamo_recompile_limit(tmp_path, image_tree,
                                                                                        monkeypatch):
    """Every network shares TappedNetwork.forward's code, which dynamo caches per code object: with four
    teachers the default recompile limit ran out and the networks past it silently ran eagerly."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # trace, no codegen
    teachers = [teacher("a", "resnet"), teacher("b", "vit"), teacher("c", "convnext"),
                teacher("c", "swin") | {"task": "d"}]
    images = image_tree | {"eval": image_tree["eval"] | {"d": image_tree["eval"]["c"]}}
    cfg = amalgam_config(tmp_path, images, teachers, student(), model_args={"compile": True},
                         trainer={"max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2})
    # The patch restores the limit that the module raises; hitting the limit raises instead of going eager.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        try:
            cli = main(["fit", "--config", str(cfg)])
        finally:
            torch._dynamo.reset()
    assert cli.trainer.global_step == 2


def test_evaluation_metrics_match_naive_formulas():
    # Student and teachers replaced by fixed logits: every reported number must equal its textbook definition
    # (task a holds union classes 0-1, task b 2-4).
    module = AmalgamationModule([teacher("a", "resnet", tap=None), teacher("b", "resnet", tap=None)],
                                student(tap=None))
    module.setup("validate")
    g = torch.Generator().manual_seed(0)
    batches = {}
    for index, (task, width) in enumerate([("a", 2), ("b", 3)]):
        n = 40
        batches[task] = {"labels": torch.randint(0, width, (n,), generator=g), "student": torch.randn(n, 5, generator=g),
                         "teachers": [torch.randn(n, 2, generator=g), torch.randn(n, 3, generator=g)]}
        batch = batches[task]
        module.forward = lambda images, z=batch["student"]: z
        module._teachers = [lambda images, z=z: Features([], z) for z in batch["teachers"]]
        module._eval_step((torch.zeros(n, 3, SIZE, SIZE), batch["labels"]), dataloader_idx=index)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module._log_eval("val")

    def mean(flags):
        return torch.cat(flags).float().mean().item()

    offsets, union_labels = {"a": (0, 2), "b": (2, 5)}, []
    for task, (a, b) in offsets.items():
        batch, labels = batches[task], batches[task]["labels"]
        own = batch["teachers"][0 if task == "a" else 1]
        assert logged[f"val/{task}/acc"] == pytest.approx(mean([batch["student"][:, a:b].argmax(1) == labels]))
        assert logged[f"val/teacher/{task}/acc"] == pytest.approx(mean([own.argmax(1) == labels]))
        assert logged[f"val/{task}/agreement"] == pytest.approx(mean([batch["student"][:, a:b].argmax(1) == own.argmax(1)]))
        union_labels.append(labels + a)
    z = [batches[t]["student"] for t in offsets]
    concat = [torch.cat(batches[t]["teachers"], 1) for t in offsets]
    assert logged["val/acc_union"] == pytest.approx(mean([s.argmax(1) == y for s, y in zip(z, union_labels)]))
    assert logged["val/teachers_concat/acc_union"] == pytest.approx(
        mean([c.argmax(1) == y for c, y in zip(concat, union_labels)]))
    expected = torch.zeros(5, 5, dtype=torch.long)  # rows: true union class
    for s, y in zip(z, union_labels):
        for true, pred in zip(y.tolist(), s.argmax(1).tolist()):
            expected[true, pred] += 1
    assert torch.equal(module.confusion["val"], expected)


def test_each_parameter_group_gets_its_learning_rate_and_the_schedule_warms_up_then_decays_to_zero():
    import math

    from amalgam.module import warmup_cosine

    module = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1, lr=0.1,
                                head_lr=0.3, block_lr=0.05, weight_decay=0.01)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert {name: g["lr"] for name, g in groups.items()} == {"student": 0.1, "head": 0.3, "blocks": 0.05}
    assert {g["weight_decay"] for g in groups.values()} == {0.01}
    default = AmalgamationModule([teacher("a", "resnet")], student(), block_width=8, block_depth=1, lr=0.1)
    assert {g["lr"] for g in default.parameter_groups()} == {0.1}  # head_lr, block_lr default to lr
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=2, total=10)
    factors = []
    for _ in range(12):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [(s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 2) / 8))) for s in range(12)]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert factors[10] == pytest.approx(0.0, abs=1e-12) and factors[11] == pytest.approx(0.0, abs=1e-12)


def test_balance_with_fewer_images_per_step_than_union_classes_is_flagged():
    import warnings
    from types import SimpleNamespace

    module = AmalgamationModule([teacher("a", "resnet", tap=None), teacher("b", "resnet", tap=None)],
                                student(tap=None), loss_weights={"balance": 1.0})  # 5 union classes
    def flagged(batch, processes):
        module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch), world_size=processes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.setup("fit")
        return [str(w.message) for w in caught if "loss_weights.balance" in str(w.message)]

    (said,) = flagged(4, 1)
    assert "over 4 images per step to be uniform over 5 classes" in said
    assert not flagged(5, 1) and not flagged(2, 4)  # 2 images on each of 4 processes: 8 in the batch mean
