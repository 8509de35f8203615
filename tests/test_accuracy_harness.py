"""The accuracy harness's bookkeeping: per-run lines -> the accuracy.json contract, and the error diagnostics' pieces
(no training)."""

import inspect
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy
import union_diagnostics

from amalgam import AmalgamationModule
from amalgam.export import load_student


def run(setting, method, seed, a, b, union, teacher_a):
    return {"setting": setting, "method": method, "seed": seed, "tasks": {"a": a, "b": b}, "acc_all": (a + b) / 2,
            "acc_union": union, "acc_union_balanced": union + 0.01, "teachers": {"a": teacher_a, "b": 0.9},
            "teachers_concat": 0.7, "seconds": 10.0, "preset": "gpu", "device": "X", "torch": "2"}


RUNS = [run("S2", "amalgam", 0, 0.90, 0.92, 0.80, 0.91), run("S2", "kd_slice", 0, 0.91, 0.93, 0.70, 0.91),
        run("S2", "amalgam", 1, 0.88, 0.94, 0.84, 0.95), run("S2", "kd_slice", 1, 0.89, 0.95, 0.72, 0.95)]


def test_summarize_means_and_stds_per_method_and_teachers_once_per_seed():
    results = accuracy.summarize(RUNS)
    assert list(results) == ["S2"] and list(results["S2"])[2:] == ["amalgam", "kd_slice"]
    amalgam = results["S2"]["amalgam"]
    assert amalgam["tasks"]["a"] == pytest.approx(0.89) and amalgam["acc_union"] == pytest.approx(0.82)
    assert amalgam["std"]["acc_union"] == pytest.approx(statistics.stdev([0.80, 0.84]))
    assert amalgam["acc_union_balanced"] == pytest.approx(0.83) and amalgam["seeds"] == 2
    # Two methods per seed share one set of teachers: each seed's teachers count once.
    assert results["S2"]["teachers"] == {"a": pytest.approx(0.93), "b": pytest.approx(0.9)}


def test_balance_offsets_make_the_mean_prediction_uniform_and_undo_a_skew_between_classes():
    # Balanced true classes, predictions skewed toward class 0 and away from class 4 by fixed offsets.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(200)
    clean = torch.nn.functional.one_hot(labels, 5).float() * 2 + torch.randn(1000, 5, generator=g)
    skewed = clean + torch.tensor([3.0, 0, 0, 0, -2.0])
    offsets = accuracy.balance_offsets(skewed)
    mean_p = (skewed + offsets).softmax(1).mean(0)
    torch.testing.assert_close(mean_p, torch.full((5,), 0.2), atol=1e-3, rtol=0)
    # On a class-balanced pool the label-free offset recovers what the skew took away.
    raw, balanced, truth = ((z.argmax(1) == labels).float().mean().item() for z in (skewed, skewed + offsets, clean))
    assert raw < truth - 0.2 and balanced == pytest.approx(truth, abs=0.02)


def test_paired_table_subtracts_the_baseline_of_the_same_seed_and_skips_unpaired_seeds():
    runs = [*RUNS, run("S2", "kd_slice", 2, 0.5, 0.5, 0.5, 0.9)]  # seed 2 has no amalgam run: left out
    table = accuracy.paired_table(runs, "amalgam")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| kd_slice")]
    assert [row[1] for row in rows] == ["0", "1", "mean"]
    # kd_slice - amalgam: task a +1 pt in both seeds; task-agnostic raw -10 and -12, mean -11.
    assert [row[2] for row in rows] == ["+1.00", "+1.00", "+1.00"]
    assert [row[5] for row in rows] == ["-10.00", "-12.00", "-11.00"]
    assert accuracy.paired_table(runs, "cfl_paper") == ""  # no such baseline: nothing to pair


def test_from_runs_writes_the_contract_from_json_lines(tmp_path):
    lines = tmp_path / "runs.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in RUNS[:2]))
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(r) + "\n" for r in RUNS[2:]) + "\n")  # a blank line is skipped
    out = tmp_path / "accuracy.json"
    accuracy.main(["--from-runs", str(lines), str(more), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["S2"]["kd_slice"]["acc_union"] == pytest.approx(0.71)
    assert written["_meta"]["seeds"] == [0, 1] and written["_meta"]["device"] == "X"
    assert written["_meta"]["command"].endswith(f"--out {out}")


def test_a_run_logged_twice_or_runs_of_two_schedules_are_refused_not_summarised(tmp_path):
    lines = tmp_path / "runs.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in [*RUNS, RUNS[0]]))  # a second grid appended seed 0
    with pytest.raises(ValueError, match="S2 amalgam seed 0 \\(x2\\)"):
        accuracy.main(["--from-runs", str(lines), "--out", str(tmp_path / "a.json")])
    six, twelve = ({"student_epochs": n, "teacher_epochs": 2} for n in (6, 12))
    mixed = [RUNS[0] | {"schedule": six}, RUNS[1] | {"schedule": twelve}, RUNS[2]]  # RUNS[2]: logged without one
    with pytest.raises(ValueError, match="S2: runs of different schedules"):
        accuracy.check_runs(mixed)
    accuracy.check_runs([RUNS[0] | {"schedule": six}, RUNS[1] | {"schedule": six}, RUNS[2]])


def test_the_table_says_how_many_seeds_and_shows_no_spread_for_one():
    table = accuracy.table(accuracy.summarize([*RUNS, run("S2", "cfl_paper", 0, 0.8, 0.8, 0.6, 0.91)]))
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["method"][1] == "seeds"
    assert rows["amalgam"][1] == "2" and rows["amalgam"][2] == "89.00 ± 1.41"
    assert rows["cfl_paper"][1] == "1" and rows["cfl_paper"][2] == "80.00"


def test_cross_task_errors_name_the_largest_pairs_across_tasks_from_the_runs_confusions():
    def with_confusion(r, shirts_as_tshirts):
        confusion = torch.eye(10, dtype=torch.long) * 100
        confusion[6, 6] -= shirts_as_tshirts  # S2: Shirt (task b) taken for T-shirt/top (task a)
        confusion[6, 0] += shirts_as_tshirts
        confusion[2, 2], confusion[2, 4] = 90, 10  # Pullover -> Coat: inside task a, not a cross-task error
        return r | {"union_confusion": confusion.tolist()}

    runs = [with_confusion(RUNS[0], 20), with_confusion(RUNS[2], 40), RUNS[1]]  # kd_slice kept no confusion
    text = accuracy.cross_task_errors(runs, top=1)
    assert "kd_slice" not in text
    (line,) = [line for line in text.splitlines() if line.startswith("- amalgam")]
    assert line == "- amalgam: 3.00 in all; Shirt -> T-shirt/top 3.00"  # 30 of 1000 images, mean of two seeds
    assert accuracy.cross_task_errors(RUNS) == ""  # runs from before confusions were kept


def test_methods_are_the_library_presets_and_ablations_change_one_thing():
    amalgam = accuracy.method_args("amalgam")
    assert amalgam["kd"] == "slice" and amalgam["loss_weights"]["mmd"] > 0
    no_cfl = accuracy.method_args("amalgam-no_cfl")
    assert no_cfl["loss_weights"] == amalgam["loss_weights"] | {"mmd": 0.0, "recon": 0.0}
    flip = accuracy.method_args("amalgam+teacher_flip")
    assert flip == amalgam | {"teacher_flip_average": True}
    neighbour = accuracy.method_args("amalgam+neighbour")
    assert neighbour == amalgam | {"loss_weights": amalgam["loss_weights"] | {"neighbour": 1.0}}
    task = accuracy.method_args("amalgam+selflabel_task")
    assert task == accuracy.method_args("amalgam+selflabel") | {"selflabel_target": "task"}
    assert accuracy.method_args("amalgam+kd_task_weighting") == amalgam | {"kd_task_weighting": 1.0}
    assert accuracy.method_args("amalgam+mixup") == amalgam | {"mixup_alpha": 1.0}
    assert accuracy.method_args("amalgam+strong_view") == amalgam | {"shared_strong_view": True}
    contrast = accuracy.method_args("amalgam+selflabel+contrast")
    assert contrast == amalgam | {"loss_weights": amalgam["loss_weights"] | {"selflabel": 1.0, "contrast": 1.0}}
    assert accuracy.method_args("kd_concat")["kd"] == "concat"


def test_selflabel_preset_is_the_benchmarked_ablation():
    """configs/presets/amalgam_selflabel.yaml is what users run; it must be what the benchmark measured."""
    init_args = yaml.safe_load((accuracy.PRESET_DIR / "amalgam_selflabel.yaml").read_text())["model"]["init_args"]
    ablation = accuracy.method_args("amalgam+selflabel")
    assert {k: init_args[k] for k in ablation} == ablation
    assert init_args["selflabel_threshold"] == inspect.signature(AmalgamationModule).parameters[
        "selflabel_threshold"].default


def test_long_preset_is_the_benchmarked_configuration():
    """amalgam_long is amalgam+selflabel with the weights the GPU run measured, and runs under its own name."""
    measured = accuracy.method_args("amalgam+selflabel")
    measured["loss_weights"] |= {"mmd": 1.0, "recon": 1.0, "entropy": 0.1}
    measured["temperature"] = 4.0
    assert accuracy.method_args("amalgam_long") == measured
    assert {"amalgam_long", "amalgam_selflabel"} <= set(accuracy.PRESET_METHODS)
    assert not set(accuracy.PRESET_METHODS) & set(accuracy.METHODS)


def test_teachers_only_trains_the_named_tasks_once_and_stops(tmp_path, capsys):
    args = ["--teachers-only", "--settings", "S2", "--seeds", "0", "--tasks", "b", "--teacher-epochs", "1",
            "--teacher-train-limit", "64", "--work", str(tmp_path)]
    assert accuracy.main(args) == {}
    (ckpt,) = (tmp_path / "cpu").glob("*.ckpt")
    assert "S2-seed0-teacher-b-" in ckpt.name and "-e1-n64" in ckpt.name
    assert not list((tmp_path / "cpu").glob("*.partial"))
    written = ckpt.stat().st_mtime_ns
    accuracy.main(args)  # cached: not trained again
    assert ckpt.stat().st_mtime_ns == written
    assert capsys.readouterr().out.count(f"teacher b: {ckpt}") == 2


TINY = ["--teacher-epochs", "1", "--teacher-train-limit", "128", "--student-epochs", "1", "--train-limit", "128"]


def test_jobs_run_each_setting_and_seed_in_its_own_process_with_the_results_of_one_process(tmp_path, capsys):
    runs_log = tmp_path / "runs.jsonl"
    grid = ["--settings", "S2", "--seeds", "0", "1", "--methods", "kd_slice", *TINY, "--work", str(tmp_path)]
    results = accuracy.main([*grid, "--jobs", "2", "--out", str(tmp_path / "a.json"), "--runs-log", str(runs_log)])
    out = capsys.readouterr().out
    assert "2 (setting, seed) units, 2 processes at once" in out and "[S2 seed 1] [accuracy] S2 seed 1 kd_slice" in out
    logged = [json.loads(line) for line in runs_log.read_text().splitlines()]
    # Appended as each process ends, in whichever order they end.
    assert sorted((r["setting"], r["seed"], r["method"]) for r in logged) == [("S2", 0, "kd_slice"), ("S2", 1, "kd_slice")]
    # Every line records the command that was typed, not a worker's.
    assert {r["command"] for r in logged} == {"python benchmarks/accuracy.py " + " ".join(
        [*grid, "--jobs", "2", "--out", str(tmp_path / "a.json"), "--runs-log", str(runs_log)])}
    assert results["S2"]["kd_slice"]["seeds"] == 2 and len(list((tmp_path / "cpu" / "logs").glob("*/*.log"))) == 2
    # A worker has one thread, like this process here: same teachers (cached), same batches, same numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = accuracy.main(["--settings", "S2", "--seeds", "0", "--methods", "kd_slice", *TINY,
                               "--work", str(tmp_path), "--jobs", "1", "--out", str(tmp_path / "b.json"),
                               "--runs-log", str(tmp_path / "alone.jsonl")])
    finally:
        torch.set_num_threads(threads)
    (seed0,) = [r for r in logged if r["seed"] == 0]
    (one,) = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]
    assert one["tasks"] == seed0["tasks"] and one["acc_union"] == seed0["acc_union"]
    assert alone["S2"]["kd_slice"]["seeds"] == 1


def test_a_failed_worker_is_named_with_its_log_and_fails_the_command(tmp_path):
    with pytest.raises(SystemExit) as stop:
        accuracy.main(["--settings", "S2", "--seeds", "0", "1", "--methods", "kd_slice", *TINY, "--jobs", "2",
                       "--data-root", str(tmp_path / "no-such-folder"), "--work", str(tmp_path),
                       "--out", str(tmp_path / "a.json")])
    message = str(stop.value)
    assert "S2 seed 0 failed (exit 1) after 0 of 1 methods" in message and "S2 seed 1 failed" in message
    log = Path(message.split("its log: ")[1].splitlines()[0])
    assert "no-such-folder" in log.read_text()  # the worker's own error, kept
    assert not (tmp_path / "a.json").exists()


def test_module_args_reach_every_student_over_the_preset():
    preset = accuracy.PRESETS["cpu"]
    teachers = [{"task": task, "classes": [f"{task}{i}" for i in range(len(ids))], "taps": ["pooled"], **family}
                for (task, ids), family in zip(accuracy.SETTINGS["S2"].items(), preset["teachers"])]
    plain = accuracy.build_student("amalgam", teachers, preset, seed=0)
    changed = accuracy.build_student("amalgam", teachers, preset | {"module_args": {"temperature": 8.0, "lr": 0.01}},
                                     seed=0)
    preset_temperature = accuracy.method_args("amalgam")["temperature"]
    assert preset_temperature != 8.0
    assert plain.hparams.temperature == preset_temperature and plain.hparams.lr == 2e-3  # the preset's, the harness's
    assert changed.hparams.temperature == 8.0 and changed.hparams.lr == 0.01
    assert changed.loss_weights == plain.loss_weights


def test_a_preset_s_channels_last_reaches_its_students_and_teachers(tmp_path):
    preset = accuracy.PRESETS["cpu"] | {"channels_last": True, "root": accuracy.DEFAULT_ROOT, "teacher_epochs": 1,
                                        "teacher_train_limit": 64}
    teachers = [{"task": task, "classes": [f"{task}{i}" for i in range(len(ids))], "taps": ["pooled"], **family}
                for (task, ids), family in zip(accuracy.SETTINGS["S2"].items(), preset["teachers"])]
    student = accuracy.build_student("kd_slice", teachers, preset, seed=0)
    assert student.hparams.channels_last
    assert not accuracy.build_student("kd_slice", teachers, accuracy.PRESETS["cpu"], seed=0).hparams.channels_last
    ckpt = accuracy.train_teacher("S2", "a", preset["teachers"][0], 0, preset, tmp_path)
    assert accuracy.torch.load(ckpt, weights_only=True)["hyper_parameters"]["channels_last"]
    assert accuracy.PRESETS["gpu"]["channels_last"]


def test_gpu_driver_trains_teachers_per_task_then_one_process_per_lane(tmp_path):
    """benchmarks/accuracy_gpu.sh with a stand-in interpreter that records its arguments and logs a run."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\nprev=\nfor a in "$@"; do\n'
                    '  [ "$prev" = --runs-log ] && echo "$RUN" >> "$a"; prev=$a\ndone\n')
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(calls),
           "RUN": json.dumps(RUNS[0]), "SETTINGS": "S3", "SEEDS": "0 1",
           "METHODS": "kd_slice cfl_paper|amalgam+selflabel", "BASELINE": "amalgam", "BASELINE_SEEDS": "1 7"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_gpu.sh"
    subprocess.run(["bash", str(script), str(out), "data", "60"], env=env, check=True, capture_output=True)
    lines = calls.read_text().splitlines()
    teachers = [line for line in lines if "--teachers-only" in line]
    assert sorted(line.split("--tasks ")[1] for line in teachers) == ["a", "a", "b", "b", "c", "c"]
    students = sorted(line.split("--methods ")[1].split(" --out")[0] for line in lines if "--methods" in line)
    assert students == ["amalgam", "amalgam+selflabel", "amalgam+selflabel", "kd_slice cfl_paper", "kd_slice cfl_paper"]
    (baseline,) = [line for line in lines if "--methods amalgam " in line]
    assert "--seeds 1 " in baseline  # the baseline lane runs for the seeds in BASELINE_SEEDS only
    assert len((out / "runs.jsonl").read_text().splitlines()) == 5  # every lane appended its run
    assert any("--from-runs" in line for line in lines)


def test_gpu_driver_reports_failed_processes_and_runs_a_baseline_once(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'case " $* " in *" $FAIL "*) echo Traceback; exit 1;; esac\nprev=\nfor a in "$@"; do\n'
                    '  [ "$prev" = --runs-log ] && echo "$RUN" >> "$a"; prev=$a\ndone\n')
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(calls), "RUN": json.dumps(RUNS[0]),
           "SETTINGS": "S2", "SEEDS": "0 1", "METHODS": "amalgam|kd_slice", "BASELINE": "amalgam cfl_paper"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_gpu.sh"
    done = subprocess.run(["bash", str(script), str(out), "data", "60"], env=env | {"FAIL": "kd_slice"},
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("lane 2 (kd_slice) exited 1") == 2 and "(log-S2-0-2.txt)" in done.stderr
    students = [line.split("--methods ")[1].split(" --out")[0] for line in calls.read_text().splitlines()
                if "--methods" in line]
    assert sorted(students) == ["amalgam", "amalgam", "cfl_paper", "cfl_paper", "kd_slice", "kd_slice"]
    # A teacher that fails stops its chain: no student would find it, and every lane would train it at once.
    calls.unlink()
    done = subprocess.run(["bash", str(script), str(out), "data", "60"], env=env | {"FAIL": "b", "SEEDS": "0"},
                          capture_output=True, text=True)
    assert done.returncode == 1 and "S2 seed 0: teacher b exited 1; its students did not run" in done.stderr
    assert "kd_slice" not in done.stderr  # the earlier grid's failures are not reported again
    assert not [line for line in calls.read_text().splitlines() if "--methods" in line]


def test_reborn_students_learn_from_a_first_generation_trained_and_exported_once(tmp_path):
    preset = accuracy.PRESETS["cpu"] | {"root": accuracy.DEFAULT_ROOT, "teacher_epochs": 1, "teacher_train_limit": 64,
                                        "train_limit": 64, "student_epochs": 1}
    teachers = accuracy.teacher_configs("S2", 0, preset, tmp_path)
    first = accuracy.first_generation("S2", 0, preset, tmp_path, teachers)
    union = [(t["task"], name) for t in teachers for name in t["classes"]]
    assert load_student(first).union == union
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*student*.ckpt"))
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert accuracy.first_generation("S2", 0, preset, tmp_path, teachers) == first  # cached
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    other = accuracy.first_generation("S2", 0, preset | {"student_epochs": 2, "train_limit": 32}, tmp_path, teachers)
    assert other != first  # another preset, another first generation
    reborn = accuracy.build_student("amalgam+reborn", teachers, preset, 0, {"union_teacher": str(first)})
    assert reborn.loss_weights["union_kd"] == 1.0 and len(reborn._union_teacher) == 1
    assert accuracy.method_args("amalgam+reborn") == accuracy.method_args("amalgam") | {
        "loss_weights": accuracy.method_args("amalgam")["loss_weights"] | {"union_kd": 1.0}}
    assert accuracy.method_args("amalgam+reborn_from_selflabel") == accuracy.method_args("amalgam+reborn")
    assert accuracy.REBORN_FROM["amalgam+reborn_from_selflabel"] == "amalgam+selflabel"


def test_batchnorm_preset_gives_every_teacher_a_task_gate(tmp_path):
    preset = accuracy.PRESETS["cpu_bn"] | {"root": accuracy.DEFAULT_ROOT, "teacher_epochs": 1,
                                           "teacher_train_limit": 64}
    teachers = accuracy.teacher_configs("S3", 0, preset, tmp_path)
    assert len({t["arch"] for t in teachers}) == 3  # three families
    student = accuracy.build_student("amalgam+selflabel+task_gate", teachers, preset, seed=0)
    assert sorted(student.task_gates) == ["a", "b", "c"]
    # On the CPU preset only the ResNet teacher has BatchNorm: one gate.
    plain = accuracy.PRESETS["cpu"] | {"root": accuracy.DEFAULT_ROOT, "teacher_epochs": 1, "teacher_train_limit": 64}
    teachers = accuracy.teacher_configs("S3", 0, plain, tmp_path)
    assert sorted(accuracy.build_student("amalgam+selflabel+task_gate", teachers, plain, seed=0).task_gates) == ["a"]


def test_evaluate_keeps_the_union_confusion_that_its_task_agnostic_accuracy_counts(tmp_path):
    preset = accuracy.PRESETS["cpu"] | {"root": accuracy.DEFAULT_ROOT, "teacher_epochs": 1, "teacher_train_limit": 64}
    teachers = accuracy.teacher_configs("S2", 0, preset, tmp_path)
    student = accuracy.build_student("amalgam", teachers, preset, seed=0)
    pool = torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8)
    result = accuracy.evaluate(student, "S2", pool, accuracy.DEFAULT_ROOT)
    confusion = torch.tensor(result["union_confusion"])
    _, y = accuracy.union_test_set("S2", accuracy.DEFAULT_ROOT)
    assert confusion.sum(1).tolist() == torch.bincount(y, minlength=10).tolist()  # rows: each true class's images
    assert confusion.trace().item() / len(y) == pytest.approx(result["acc_union"])
    json.dumps(result)  # a run line of --runs-log


# ---------------------------------------------------------------- union_diagnostics.py (no training)


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    got = accuracy.confusion_matrix(pred, target, 3)
    assert got.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_linear_probe_separates_what_a_linear_boundary_separates():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 8, generator=g)
    pred = union_diagnostics.linear_probe(x[:200], y[:200], x[200:], 3)
    assert (pred == y[200:]).float().mean() > 0.95


def test_centroid_labels_repair_a_head_that_swaps_two_clusters_half_the_time():
    # Two tight clusters; the head's softmax leans the right way only slightly, so its argmax is often wrong
    # but the weighted centres still land in the right cluster, and nearest-centre labels are all right.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])[y] + 0.05 * torch.randn(200, 2, generator=g)
    lean = 0.55 + 0.2 * torch.rand(200, generator=g) - 0.1
    probs = torch.stack([torch.where(y == 0, lean, 1 - lean), torch.where(y == 0, 1 - lean, lean)], 1)
    assert (probs.argmax(1) == y).float().mean() < 0.9
    rounds = union_diagnostics.centroid_labels(x, probs, x, rounds=2)
    assert len(rounds) == 2 and all((r == y).all() for r in rounds)


def test_confusion_plot_writes_a_picture(tmp_path):
    from amalgam.visualize import confusion_plot

    path = confusion_plot([[5, 1, 0], [2, 3, 0], [0, 0, 4]], ["x", "y", "z"], ["a", "a", "b"], tmp_path / "c.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
