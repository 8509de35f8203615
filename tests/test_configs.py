"""Every YAML in configs/ is a contract: each parses with the real CLI, and the small ones run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from amalgam.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
BASE = REPO / "configs" / "fashion" / "amalgamate.yaml"


def is_fragment(path: Path) -> bool:
    """Presets (loggers, GPU, paper settings) complete a run config rather than stand alone."""
    return "class_path" not in (yaml.safe_load(path.read_text()).get("model") or {})


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_parses(path, capsys):
    configs = ["--config", str(BASE), "--config", str(path)] if is_fragment(path) else ["--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("amalgam.")
    assert printed["data"]["class_path"].startswith("amalgam.data.")


def _without_checkpoints(tmp_path: Path) -> Path:
    config = yaml.safe_load(BASE.read_text())
    for teacher in config["model"]["init_args"]["teachers"]:
        teacher.pop("checkpoint")  # random teachers: this checks wiring, not accuracy
    path = tmp_path / "amalgamate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["teacher_a", "teacher_b", "amalgamate"])
def test_fashion_configs_run(name, tmp_path):
    path = _without_checkpoints(tmp_path) if name == "amalgamate" else REPO / "configs" / "fashion" / f"{name}.yaml"
    cli = main(["fit", "--config", str(path), "--trainer.fast_dev_run", "2", "--trainer.default_root_dir",
                str(tmp_path), "--data.init_args.train_limit", "512", "--data.init_args.eval_limit", "64",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    assert "val/acc" in cli.trainer.callback_metrics or "val/acc_union" in cli.trainer.callback_metrics


PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_method_presets_train_on_top_of_the_fashion_run(preset, tmp_path):
    cli = main(["fit", "--config", str(_without_checkpoints(tmp_path)), "--config", str(preset),
                "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
                "--data.init_args.train_limit", "512", "--data.init_args.eval_limit", "64",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    weights = yaml.safe_load(preset.read_text())["model"]["init_args"]["loss_weights"]
    assert {k: cli.model.loss_weights[k] for k in weights} == weights
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
