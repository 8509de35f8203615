"""The supervised Classifier that trains specialist teachers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import SIZE, TASK_CLASSES, TINY

from amalgam import Classifier
from amalgam.data.fashion_mnist import DEFAULT_ROOT, FASHION_MNIST_CLASSES


def _classifier(**extra) -> Classifier:
    torch.manual_seed(0)
    return Classifier(classes=TASK_CLASSES["b"], task="b", input_size=SIZE, **TINY["resnet"], **extra)


def test_channels_last_gives_the_same_logits_and_gradients():
    plain, fast = _classifier(), _classifier(channels_last=True)
    fast.configure_model()
    assert fast.net.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = torch.rand(6, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = [m.training_step((images, labels), 0) for m in (plain, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    grad = [m.net.model.fc.weight.grad for m in (plain, fast)]
    torch.testing.assert_close(grad[0], grad[1], rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_on_a_fixed_batch():
    model = _classifier(lr=1e-2, channels_last=True)
    images, labels = torch.rand(12, 3, SIZE, SIZE), torch.arange(12) % 3
    loader = torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=12)
    trainer = L.Trainer(max_epochs=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model.eval()(images), labels).item()
    trainer.fit(model.train(), loader)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model.eval()(images), labels).item()
    assert after < 0.5 * before


def test_data_classes_must_match():
    model = _classifier()

    data = SimpleNamespace(task_classes={"b": ["car", "van", "bus"]})
    model.trainer = SimpleNamespace(datamodule=data)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="differ from model.classes"):
        model.setup("fit")


def test_a_task_the_data_does_not_have_is_refused_not_left_unchecked():
    # The default task name, as in a config that leaves `task` out.
    model = Classifier(classes=TASK_CLASSES["b"], input_size=SIZE, **TINY["resnet"])
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(task_classes={"b": ["car", "van", "bus"]}))  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"classifier task 'task' is not one of the data's tasks \['b'\]"):
        model.setup("fit")
    model.setup("predict")  # predict reads no labels: a teacher may predict another task's images
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(task_classes={}))  # type: ignore[assignment]
    model.setup("fit")  # a data module without labelled tasks: nothing to check


def test_a_teacher_takes_its_preprocessing_and_checks_its_classes_from_a_classifier_checkpoint(tmp_path):
    from amalgam import Teacher

    model = Classifier(classes=["x", "y", "z"], task="b", input_size=SIZE - 8, mean=[0.25] * 3, std=[0.5] * 3,
                       **TINY["resnet"])
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    teacher = Teacher("b", ["x", "y", "z"], TINY["resnet"]["arch"], checkpoint=str(path),
                      model_kwargs=TINY["resnet"]["model_kwargs"])
    assert teacher.net.input_size == SIZE - 8
    assert teacher.net.mean.flatten().tolist() == [0.25] * 3 and teacher.net.std.flatten().tolist() == [0.5] * 3
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(teacher(images).logits, model.eval()(images))
    # The entry's own values win; classes listed in another order are read as given, with a warning.
    teacher = Teacher("b", ["x", "y", "z"], TINY["resnet"]["arch"], checkpoint=str(path), input_size=SIZE,
                      model_kwargs=TINY["resnet"]["model_kwargs"])
    assert teacher.net.input_size == SIZE
    with pytest.warns(UserWarning, match=r"classes \['z', 'y', 'x'\] differ from those its checkpoint"):
        Teacher("b", ["z", "y", "x"], TINY["resnet"]["arch"], checkpoint=str(path),
                model_kwargs=TINY["resnet"]["model_kwargs"])


def test_a_teacher_with_a_class_name_twice_is_refused():
    """Two logits of one name: its evaluation labels and the union head could not tell them apart."""
    from amalgam import Teacher

    with pytest.raises(ValueError, match=r"^teacher 'b': 'classes' lists \['car'\] more than once "
                                         r"\(\['car', 'car', 'van'\]\); give each of its logits its own name"):
        Teacher("b", ["car", "car", "van"], TINY["resnet"]["arch"], input_size=SIZE,
                model_kwargs=TINY["resnet"]["model_kwargs"])


class Stopped(Exception):
    pass


class StopAt(L.Callback):
    """Stops a run before its fifth training step, as a crash would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            raise Stopped


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
def test_teacher_training_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    from amalgam.cli import main

    def config(name: str, **trainer) -> str:
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp_path / name), "save_last": True, "every_n_train_steps": 1}}
        cfg = {"seed_everything": 0,
               "trainer": {"accelerator": "cpu", "max_epochs": 2, "logger": False, "enable_progress_bar": False,
                           "default_root_dir": str(tmp_path / name),
                           "limit_val_batches": 1, "callbacks": [checkpoint], **trainer},
               "model": {"class_path": "amalgam.Classifier",
                         "init_args": {"task": "a", "classes": FASHION_MNIST_CLASSES[:5], "input_size": 28,
                                       **TINY["resnet"]}},
               # 3 batches of 16 per epoch, random crops and flips (the data module's defaults).
               "data": {"class_path": "amalgam.data.FashionMNISTDataModule",
                        "init_args": {"supervised_task": "a", "batch_size": 16, "train_limit": 50, "eval_limit": 16}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    main(["fit", "--config", config("full")])
    with pytest.raises(Stopped):  # one batch into the second epoch, as a crash would stop it
        main(["fit", "--config", config("run"), "--trainer.callbacks+", f"{__name__}.StopAt"])
    stopped = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 4 and stopped["epoch"] == 1
    main(["fit", "--config", config("run"), "--ckpt_path", "last"])
    full, resumed = (torch.load(tmp_path / n / "last.ckpt", weights_only=True) for n in ("full", "run"))
    assert full["global_step"] == resumed["global_step"] == 6
    differ = [k for k in full["state_dict"] if not torch.equal(full["state_dict"][k], resumed["state_dict"][k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
