"""The whole story on real Fashion-MNIST, in one command: ``python -m amalgam.demo`` (``make demo``).

1. two specialist teachers of different families learn disjoint halves of the classes, with labels
   (skipped when their checkpoints already exist);
2. a student of a third architecture learns both tasks from the unlabeled training images (CFL);
3. the test split scores everyone; ``<out>/summary.json``, ``summary.md`` and three pictures (accuracy bars,
   the common space, the task-agnostic confusion) are written.

Every stage is the ordinary CLI on the YAML files in ``configs/fashion/``: the demo only rewrites their
output paths, epochs and data limits into ``<artifacts>/configs/`` and runs them in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from amalgam.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion"
DEFAULT_ARTIFACTS = "artifacts/fashion"


def _retarget(node: Any, old: str, new: str) -> Any:
    """Replace the artifacts folder in every string of a config."""
    if isinstance(node, dict):
        return {k: _retarget(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


def stage_config(name: str, artifacts: Path, epochs: int | None, data: dict[str, Any]) -> Path:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config = _retarget(config, DEFAULT_ARTIFACTS, str(artifacts))
    if epochs is not None:
        config["trainer"]["max_epochs"] = epochs
    config["data"]["init_args"].update(data)
    path = artifacts / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stale_teacher(ckpt: Path, config: Path) -> str:
    """What differs between a saved teacher and its config (arch, classes, model_kwargs, epochs, training
    images); "" if nothing.

    A checkpoint left by an older version of the config would otherwise fail to load in the amalgamation, and
    one left by a shorter run (``--teacher-epochs 1 --train-limit 500``) would quietly weaken a full demo.
    """
    if not ckpt.exists():
        return ""
    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    config_all = yaml.safe_load(config.read_text())
    saved, wanted = checkpoint.get("hyper_parameters", {}), config_all["model"]["init_args"]
    differ = [f"{k}: {saved.get(k)} != {wanted.get(k)}" for k in ("arch", "classes", "model_kwargs")
              if saved.get(k) != wanted.get(k)]
    epochs, wanted_epochs = checkpoint.get("epoch", -1) + 1, config_all["trainer"].get("max_epochs")
    if epochs != wanted_epochs:
        differ.append(f"epochs: {epochs} != {wanted_epochs}")
    limit = checkpoint.get("datamodule_hyper_parameters", {}).get("train_limit")
    wanted_limit = config_all["data"]["init_args"].get("train_limit")
    if limit != wanted_limit:
        differ.append(f"train_limit: {limit} != {wanted_limit}")
    return ", ".join(differ)


def run_stage(args: list[str]) -> Any:
    """One CLI run in this process, as if typed after ``python -m amalgam``.

    LightningCLI also looks at ``sys.argv`` (the demo's own flags, or a notebook kernel's) and warns when it
    gets both: hide it for the stage.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return cli_main(args)
    finally:
        sys.argv = argv


def _metric(metrics: dict, key: str) -> float:
    return round(float(metrics[key]), 4)


def run_demo(out: str = "reports/demo", artifacts: str = DEFAULT_ARTIFACTS, teacher_epochs: int | None = None,
             student_epochs: int | None = None, train_limit: int | None = None, eval_limit: int | None = None,
             plot_method: str = "tsne", progress: bool = True) -> dict:
    """Runs the pipeline and returns the summary (also written to ``<out>/summary.json`` and ``.md``)."""
    out_dir, art = Path(out), Path(artifacts)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in {"train_limit": train_limit, "eval_limit": eval_limit}.items() if v is not None}
    quiet = [] if progress else ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    # The evaluate stage scores teachers and student on the whole test split at the end; validating after
    # every epoch as well would cost ~8 s per amalgamation epoch on 2 CPU cores, for numbers nobody reads.
    no_val = ["--trainer.limit_val_batches", "0"]
    seconds: dict[str, float] = {}
    start_all = time.perf_counter()

    for name in ("teacher_a", "teacher_b"):
        ckpt = art / f"{name}.ckpt"
        start = time.perf_counter()
        config = stage_config(name, art, teacher_epochs, data)
        stale = stale_teacher(ckpt, config)
        if ckpt.exists() and not stale:
            print(f"[demo] {name}: {ckpt} exists, skipping its training (delete it to retrain)")
        else:
            if stale:
                print(f"[demo] {name}: {ckpt} was trained with other settings ({stale}); retraining it")
            print(f"[demo] {name}: training a specialist with labels on its own classes")
            run_stage(["fit", "--config", str(config), *no_val, *quiet])
        seconds[name] = round(time.perf_counter() - start, 1)

    print("[demo] amalgamate: one student learns both tasks from unlabeled images")
    config = stage_config("amalgamate", art, student_epochs, data)
    start = time.perf_counter()
    # 100 test images per task: a readable t-SNE in ~3 s on 2 cores (150 took ~5 s).
    plot = ["--trainer.callbacks+", "amalgam.visualize.CommonSpacePlot", "--trainer.callbacks.dirpath",
            str(out_dir), "--trainer.callbacks.method", plot_method, "--trainer.callbacks.num_images", "100"]
    run_stage(["fit", "--config", str(config), *plot, *no_val, *quiet])
    seconds["amalgamate"] = round(time.perf_counter() - start, 1)

    print("[demo] evaluate: teachers and student on the Fashion-MNIST test split")
    start = time.perf_counter()
    confusion = ["--trainer.callbacks+", "amalgam.visualize.ConfusionPlot", "--trainer.callbacks.dirpath",
                 str(out_dir)]
    cli = run_stage(["test", "--config", str(config), "--ckpt_path", str(art / "last.ckpt"), *confusion, *quiet])
    seconds["evaluate"] = round(time.perf_counter() - start, 1)
    seconds["total"] = round(time.perf_counter() - start_all, 1)

    m = cli.trainer.callback_metrics
    tasks = cli.model.task_names
    summary = {
        "teachers": {t: {"acc": _metric(m, f"test/teacher/{t}/acc"), "arch": cli.model.init_args.teachers[i]["arch"]}
                     for i, t in enumerate(tasks)},
        "student": {"arch": cli.model.init_args.student["arch"],
                    "tasks": {t: {"acc": _metric(m, f"test/{t}/acc")} for t in tasks},
                    "acc_union": _metric(m, "test/acc_union")},
        "teachers_concat": {"acc_union": _metric(m, "test/teachers_concat/acc_union")},
        "seconds": seconds,
        "settings": {"teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
                     "train_limit": train_limit, "eval_limit": eval_limit},
    }
    from amalgam.visualize import accuracy_bars

    accuracy_bars(summary, out_dir / "accuracy.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    lines = ["# amalgam demo: Fashion-MNIST", "",
             "| | task-aware accuracy | |", "|---|---|---|",
             "| task | teacher (own task) | student |"]
    for task, t in s["teachers"].items():
        lines.append(f"| {task} ({t['arch']} teacher) | {100 * t['acc']:.2f} | "
                     f"{100 * s['student']['tasks'][task]['acc']:.2f} |")
    lines += ["", "| task-agnostic (all classes, task unknown) | accuracy |", "|---|---|",
              f"| teachers' concatenated logits | {100 * s['teachers_concat']['acc_union']:.2f} |",
              f"| student ({s['student']['arch']}), one head | {100 * s['student']['acc_union']:.2f} |",
              "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["seconds"].items()]
    lines += ["", "![accuracy](accuracy.png)", "", "![common feature space](common_space.png)", "",
              "![task-agnostic confusion](confusion_test.png)", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/demo", help="where summary.json/.md and the pictures go")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="where checkpoints and logs go")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the teacher configs' max_epochs")
    p.add_argument("--student-epochs", type=int, default=None, help="override the student config's max_epochs")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--eval-limit", type=int, default=None, help="use only this many test images per task")
    p.add_argument("--plot", choices=["tsne", "pca"], default="tsne", help="common-space projection")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    run_demo(a.out, a.artifacts, a.teacher_epochs, a.student_epochs, a.train_limit, a.eval_limit, a.plot)
