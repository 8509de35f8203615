"""The paper-style reference step agrees with amalgam's; the throughput harness runs; GPU presets parse."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import student, teacher
from torch import nn

from amalgam import AmalgamationModule
from amalgam.backbones import SmallMapConv2d, use_small_map_convs
from amalgam.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from reference_step import ReferenceStep, compare  # noqa: E402

CONTRACT = {"case", "batch", "ref_img_s", "amalgam_img_s", "ratio", "peak_mem_gib", "mfu"}


@pytest.mark.parametrize(
    ("families", "tap", "args"),
    [
        ([("a", "resnet"), ("b", "vit"), ("c", "swin")], "map", {}),
        ([("a", "convnext"), ("b", "vit")], "vector",
         {"kd": "slice", "temperature": 4.0, "loss_weights": {"balance": 1.0, "entropy": 0.1}}),
        ([("a", "resnet"), ("b", "vit")], None, {}),
        ([("a", "resnet"), ("b", "vit")], "two", {}),
        ([("a", "resnet"), ("b", "convnext")], "vector", {"kd": "slice", "loss_weights": {"balance": 1.0}}),
    ],
    ids=["cnn+vit+swin-map-concat", "convnext+vit-vector-slice-prior", "kd-only", "two-taps-each",
         "balance-only"],
)
def test_reference_losses_match_amalgam_fp32(families, tap, args):
    torch.manual_seed(0)
    if tap == "two":  # two common-feature blocks: every term sums over both
        two = {"resnet": ["layer3", "layer4"], "vit": ["blocks.0", "blocks.1"], "student": ["layer3", "layer4"]}
        teachers = [teacher(t, fam, taps=two[fam]) for t, fam in families]
        module = AmalgamationModule(teachers, student(taps=two["student"]), block_width=8, block_depth=1, **args)
        assert len(module.blocks) == 2
    else:
        module = AmalgamationModule([teacher(t, fam, tap) for t, fam in families], student(tap), block_width=8,
                                    block_depth=1, **args)
    reference = ReferenceStep(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training_step's self.log outside a Trainer
        diffs = compare(module, reference, torch.rand(8, 3, 32, 32))
    assert {"kd", "loss"} <= set(diffs) and (tap is None or {"mmd", "recon"} <= set(diffs))
    assert max(diffs.values()) < 1e-5, diffs


def test_reference_trains_its_own_copies():
    torch.manual_seed(0)
    module = AmalgamationModule([teacher("a", "resnet"), teacher("b", "vit")], student(), block_width=8,
                                block_depth=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    reference = ReferenceStep(module)
    logged = reference.step(torch.rand(8, 3, 32, 32))
    assert set(logged) == {"kd", "mmd", "recon", "loss"} and all(isinstance(v, float) for v in logged.values())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"the reference changed amalgam's {k}"
    assert not any(isinstance(m, SmallMapConv2d) for m in reference.student.model.modules())


def test_teacher_outputs_hold_no_autograd_graph():
    module = AmalgamationModule([teacher("a", "resnet"), teacher("b", "vit")], student(), block_width=8,
                                block_depth=1)
    for out in module.teacher_outputs(torch.rand(4, 3, 32, 32)):
        for t in [*out.taps, out.logits]:
            assert t.grad_fn is None and not t.requires_grad


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, stride=2),
                                  dict(kernel_size=1, bias=False), dict(kernel_size=2, stride=2),
                                  dict(kernel_size=5, padding=4, dilation=2), dict(kernel_size=(3, 1), padding=(1, 0))])
@pytest.mark.parametrize("side", [(1, 1), (2, 2), (2, 3), (4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_equals_conv(conv, side, channels_last):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, **conv)
    fast = use_small_map_convs(copy.deepcopy(plain))
    assert isinstance(fast, SmallMapConv2d) and fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 6, *side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_plain, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        out_plain = plain(x_plain)
    except RuntimeError:  # kernel larger than the padded map: both refuse it
        with pytest.raises(RuntimeError):
            fast(x_fast)
        return
    out_fast = fast(x_fast)
    torch.testing.assert_close(out_fast, out_plain)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    torch.testing.assert_close(x_fast.grad, x_plain.grad)
    if plain.bias is not None:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad)


@pytest.mark.parametrize("side", [(1, 1), (2, 2), (2, 3)])
def test_small_map_conv_compiles_as_one_graph(side):
    """Under torch.compile the matrix-product path is traced whole: a graph break there split every ResNet into
    one frame per conv, and on a GPU those frames hit dynamo's recompile limit and fell back to eager."""
    torch.manual_seed(0)
    conv = use_small_map_convs(nn.Conv2d(6, 5, kernel_size=3, padding=1, stride=2))
    x = torch.randn(4, 6, *side).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), nn.Conv2d.forward(conv, x))
    assert not conv.__dict__.get("_selection_cache")  # traced, not cached: no side effect inside the graph


def test_small_map_conv_leaves_other_convs_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert all(type(m) is nn.Conv2d for m in use_small_map_convs(model))


def test_throughput_runs_end_to_end_and_writes_the_contract(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--cases", "tiny", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--no-memory", "--e2e", "--workers", "0", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and {"torch", "lightning", "timm"} <= set(result["versions"])
    (row,) = result["rows"]
    assert CONTRACT <= set(row) and row["case"] == "tiny" and row["batch"] == 8
    assert row["ref_img_s"] > 0 and row["amalgam_img_s"] > 0 and row["mfu"] is None
    assert row["ratio"] == pytest.approx(row["ref_ms"] / row["amalgam_ms"], rel=0.01)
    assert row["flops_per_img"] > 0 and row["max_rel_diff_fp32"] < 1e-5 and row["e2e_img_s"] > 0
    assert "| tiny | 8 |" in run.stdout


def test_throughput_keeps_finished_rows_when_a_later_case_fails(tmp_path, monkeypatch):
    import throughput

    row = {"case": "tiny", "batch": 8, "ref_img_s": 1.0, "amalgam_img_s": 2.0, "ratio": 2.0, "flops_per_img": 1.0,
           "mfu": None} | dict.fromkeys(["peak_mem_gib", "ref_peak_mem_gib", "step_mem_gib", "ref_step_mem_gib"])

    def measure(args, case, batch):
        if case != "tiny":
            raise RuntimeError(f"case {case}: step failed")
        return dict(row)

    monkeypatch.setattr(throughput, "measure", measure)
    out = tmp_path / "throughput.json"
    with pytest.raises(RuntimeError, match="case c"):
        throughput.main(["--cases", "tiny,c", "--no-memory", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "tiny" and row["amalgam_img_s"] == 2.0


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv is not ours
@pytest.mark.parametrize("preset", ["single_gpu_bf16", "ddp_node", "ddp_multinode"])
def test_gpu_presets_parse_on_top_of_a_run_config(preset, capsys):
    base, path = REPO / "configs" / "fashion" / "amalgamate.yaml", REPO / "configs" / "gpu" / f"{preset}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(base), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (None, 0)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["strategy"] == ("auto" if preset == "single_gpu_bf16" else "ddp")
    assert trainer["num_nodes"] == (2 if preset == "ddp_multinode" else 1)
