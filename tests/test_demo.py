"""The demo's bookkeeping (the whole pipeline runs in tests/test_notebook.py)."""

from __future__ import annotations

import torch
import yaml

from amalgam.demo import stage_config, stale_teacher


def test_teacher_checkpoint_from_other_settings_is_retrained_not_reused(tmp_path):
    config = stage_config("teacher_b", tmp_path, epochs=1, data={})
    wanted = yaml.safe_load(config.read_text())["model"]["init_args"]
    ckpt = tmp_path / "teacher_b.ckpt"
    assert stale_teacher(ckpt, config) == ""  # nothing saved yet: plain training, no "stale" message

    same = {"hyper_parameters": {k: wanted[k] for k in ("arch", "classes", "model_kwargs")}, "epoch": 0,
            "datamodule_hyper_parameters": {"train_limit": None}}
    torch.save(same, ckpt)
    assert stale_teacher(ckpt, config) == ""
    # A teacher from a shorter run (fewer epochs, fewer images) would quietly weaken the demo.
    torch.save({**same, "epoch": 0, "datamodule_hyper_parameters": {"train_limit": 500}}, ckpt)
    assert stale_teacher(ckpt, config) == "train_limit: 500 != None"
    torch.save(same, ckpt)
    assert stale_teacher(ckpt, stage_config("teacher_b", tmp_path, epochs=3, data={})) == "epochs: 1 != 3"

    older = {**wanted["model_kwargs"], "embed_dim": wanted["model_kwargs"]["embed_dim"] + 32}
    torch.save({**same, "hyper_parameters": {"arch": wanted["arch"], "classes": wanted["classes"],
                                             "model_kwargs": older}}, ckpt)
    message = stale_teacher(ckpt, config)
    assert "model_kwargs" in message and str(older["embed_dim"]) in message
    assert "arch" not in message

