"""The supervised Classifier that trains specialist teachers."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import SIZE, TASK_CLASSES, TINY

from amalgam import Classifier


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
