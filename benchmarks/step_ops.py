"""Counts the aten ops of one training step (forward and backward, teachers included, optimizer excluded) of the
accuracy harness's models. On a GPU each op is at least one kernel launch, so small models become launch-bound.

    python benchmarks/step_ops.py                    # GPU preset, S2, methods amalgam and kd_slice
    python benchmarks/step_ops.py --preset cpu --methods amalgam amalgam+selflabel

Runs on the CPU with randomly initialised teachers: op counts do not depend on the weights or the device.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # the harness: its presets and student builder

from amalgam import Classifier


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(A.PRESETS), default="gpu")
    p.add_argument("--setting", choices=list(A.SETTINGS), default="S2")
    p.add_argument("--methods", nargs="+", default=["amalgam", "kd_slice"])
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    preset = A.PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = []
        for (task, ids), family in zip(A.SETTINGS[args.setting].items(), preset["teachers"]):
            classes = [A.FASHION_MNIST_CLASSES[i] for i in ids]
            path = Path(tmp) / f"{task}.ckpt"
            classifier = Classifier(classes=classes, task=task, **family)
            torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path)
            teachers.append({"task": task, "classes": classes, "checkpoint": str(path), "taps": ["pooled"], **family})
        for method in args.methods:
            model = A.build_student(method, teachers, preset, seed=0).train()
            images = torch.rand(args.batch, 3, 28, 28)
            counter = OpCounter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # self.log outside a Trainer
                model.training_step(images, 0).backward()  # the first step also runs one-off set-up work
                with counter:
                    model.training_step(images, 1).backward()
            views = sum(n for op, n in counter.counts.items() if op in ("aten.view", "aten.detach", "aten.t",
                                                                         "aten._unsafe_view", "aten.expand"))
            print(f"{args.preset} {args.setting} {method}: {sum(counter.counts.values())} aten ops per step "
                  f"({views} of them views/detach/transposes); most frequent: "
                  + ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in counter.counts.most_common(6)))


if __name__ == "__main__":
    main()
