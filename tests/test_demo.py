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

    torch.save({"hyper_parameters": {k: wanted[k] for k in ("arch", "classes", "model_kwargs")}}, ckpt)
    assert stale_teacher(ckpt, config) == ""

    older = {**wanted["model_kwargs"], "embed_dim": wanted["model_kwargs"]["embed_dim"] + 32}
    torch.save({"hyper_parameters": {"arch": wanted["arch"], "classes": wanted["classes"], "model_kwargs": older}},
               ckpt)
    message = stale_teacher(ckpt, config)
    assert "model_kwargs" in message and str(older["embed_dim"]) in message
    assert "arch" not in message

