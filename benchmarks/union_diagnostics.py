"""Where task-agnostic errors come from, for one trained student of the accuracy harness.

    OMP_NUM_THREADS=1 python benchmarks/union_diagnostics.py --setting S3 --seed 0 --method amalgam+selflabel

Trains the harness's student of that method, setting and seed (or reuses it: it is cached under --work like a
born-again student's first generation, with the same teachers), then measures on the test images:
- the union head: task-agnostic accuracy and its confusion over the union classes (picture and JSON), and its
  mean prediction on the unlabeled pool (what the union prior's balance term asks to be uniform);
- a linear probe on the student's pooled features, fitted *with labels* on the unlabeled pool's true classes.
  A diagnostic only, never part of a method: if it is far above the head, the features do separate the
  classes and what is missing is a label-free way to place the head's boundaries between look-alike classes
  of different teachers;
- label-free centroid pseudo-labels in the same features (SHOT, Liang et al. 2020): class centres weighted by
  the head's softmax on the pool, then nearest-centre labels refined a few rounds. If they beat the head, the
  feature clusters hold task information the head does not use, and a training term built on them could;
- three more label-free rules (label_free.py): over-clustering with optimal transport to uniform class mass,
  class-balanced self-training, and an in-task gate from each BatchNorm teacher's running statistics (how well
  it tells that teacher's task from the rest, against the student's own slice mass, and the union head with
  the gate folded in).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # the harness: presets, teachers, cached students, test set
import label_free

from amalgam.data import FASHION_MNIST_CLASSES
from amalgam.data.fashion_mnist import load_fashion_mnist
from amalgam.export import Student, load_student
from amalgam.teacher import Teacher
from amalgam.visualize import confusion_plot


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int,
                 l2: float = 1e-4, iterations: int = 300) -> torch.Tensor:
    """Multinomial logistic regression (L-BFGS, standardised inputs); returns the test predictions."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(train_x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (test_x @ w + b).argmax(1).detach()


def centroid_labels(pool_x: torch.Tensor, pool_probs: torch.Tensor, test_x: torch.Tensor, rounds: int = 3
                    ) -> list[torch.Tensor]:
    """SHOT's pseudo-labels without labels: centres of the pool's features weighted by the head's softmax, then
    nearest-centre (cosine) labels and centres re-estimated from them. Test predictions after each round."""
    pool, test = F.normalize(pool_x, dim=1), F.normalize(test_x, dim=1)
    centres = F.normalize(pool_probs.T @ pool, dim=1)
    out = []
    for _ in range(rounds):
        out.append((test @ centres.T).argmax(1))
        hard = F.one_hot((pool @ centres.T).argmax(1), pool_probs.shape[1]).float()
        centres = F.normalize(hard.T @ pool, dim=1)
    return out


@torch.inference_mode()
def features_and_logits(student: Student, images: torch.Tensor, batch: int = 1000
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (pre-logits) features and union logits of uint8 [N, 28, 28] images."""
    feats, logits = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch, None].expand(-1, 3, -1, -1).float().div(255)
        pooled = student.model.forward_head(student.model.forward_features(student.preprocess(x)), pre_logits=True)
        feats.append(pooled.float())
        logits.append(student.model.get_classifier()(pooled).float())
    return torch.cat(feats), torch.cat(logits)


def label_free_readouts(pool_f: torch.Tensor, pool_z: torch.Tensor, pool_y: torch.Tensor, test_f: torch.Tensor,
                        acc) -> dict:
    """Over-clustering and class-balanced self-training on the student's pooled features (label_free.py)."""
    pool_probs, k = pool_z.softmax(1), pool_z.shape[1]
    out: dict = {"over_cluster_acc": {}, "over_cluster_purity_with_labels": {}, "balanced_self_training": {}}
    for clusters in (20, 100, 500):
        pred, pool_cluster = label_free.over_cluster_labels(pool_f, pool_probs, test_f, clusters)
        counts = torch.zeros(clusters, k).index_put_((pool_cluster, pool_y), torch.ones(len(pool_y)), accumulate=True)
        out["over_cluster_acc"][clusters] = acc(pred)
        out["over_cluster_purity_with_labels"][clusters] = round(counts.max(1).values.sum().item() / len(pool_y), 4)
    for share in (0.1, 0.5):  # of a class's expected size in the pool
        rows, labels = label_free.balanced_confident(pool_probs, int(share * len(pool_f) / k))
        out["balanced_self_training"][share] = {
            "selected_correct": round((pool_y[rows] == labels).float().mean().item(), 4),
            "acc": acc(linear_probe(pool_f[rows], labels, test_f, k, l2=1e-3, iterations=200))}
    return out


def batchnorm_gates(teachers: list[dict], pool_images: torch.Tensor, test_images: torch.Tensor,
                    test_z: torch.Tensor, y: torch.Tensor, names: list[str], task_index: torch.Tensor,
                    setting: str, acc) -> dict:
    """For each teacher with BatchNorm: the in-task gate from its running statistics, fitted on the pool."""
    tasks = accuracy.SETTINGS[setting]
    first = 0
    out = {}
    for index, config in enumerate(teachers):
        width = len(tasks[config["task"]])
        span = slice(first, first + width)
        first += width
        moments = label_free.BatchNormMoments(Teacher(**config).eval())
        if not moments.layers:
            continue
        gate = label_free.fit_moment_gate(moments(pool_images), prior=width / len(test_z[0]))
        with torch.no_grad():
            g = gate(moments(test_images)).clamp(1e-4, 1 - 1e-4)
        in_task = task_index[y] == index
        log_p = test_z.log_softmax(1)
        slice_mass = log_p[:, span].logsumexp(1).exp().clamp(1e-6, 1 - 1e-6)
        folded = {}
        for weight in (0.5, 1.0, 2.0):  # the gate's log-odds, shared between the slice and the rest
            shift = torch.full_like(log_p, -0.5) * weight * torch.logit(g)[:, None]
            shift[:, span] *= -1
            folded[weight] = acc((log_p + shift).argmax(1))
        out[config["task"]] = {
            "layers": len(moments.layers),
            "auc_gate": round(label_free.auc(g, in_task), 4),
            "auc_student_slice_mass": round(label_free.auc(slice_mass, in_task), 4),
            "auc_both": round(label_free.auc(torch.logit(slice_mass) + torch.logit(g), in_task), 4),
            "gate_mean_per_class": {n: round(g[y == i].mean().item(), 3) for i, n in enumerate(names)},
            "head_acc_gate_folded": folded,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(accuracy.SETTINGS), default="S3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="amalgam+selflabel",
                   choices=accuracy.METHODS + accuracy.PRESET_METHODS + list(accuracy.ABLATIONS))
    p.add_argument("--preset", choices=list(accuracy.PRESETS), default="cpu")
    p.add_argument("--student-epochs", type=int, default=6, help="override the preset (default 6)")
    p.add_argument("--pool", type=int, default=20000, help="unlabeled training images for the probe and centres")
    p.add_argument("--data-root", default=accuracy.DEFAULT_ROOT)
    p.add_argument("--work", default="artifacts/bench-accuracy", help="teachers and students are cached here")
    p.add_argument("--out", default="benchmarks/results/union-diagnostics")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    grid_args = argparse.Namespace(preset=args.preset, data_root=args.data_root, student_epochs=args.student_epochs,
                                   teacher_epochs=None, train_limit=None, teacher_train_limit=None, student=None,
                                   loss_weights=None, module_args=None, work=args.work)
    preset, work = accuracy.grid_preset(grid_args)
    teachers = accuracy.teacher_configs(args.setting, args.seed, preset, work)
    student = load_student(str(accuracy.first_generation(args.setting, args.seed, preset, work, teachers,
                                                        args.method))).eval()

    class_ids = [i for ids in accuracy.SETTINGS[args.setting].values() for i in ids]
    union_of = torch.full((10,), -1, dtype=torch.long)
    union_of[class_ids] = torch.arange(len(class_ids))
    k = len(class_ids)
    pool_images, pool_labels = load_fashion_mnist(args.data_root, "train")
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    pool_f, pool_z = features_and_logits(student, pool_images[:args.pool])
    test_f, test_z = features_and_logits(student, test_images)
    y = union_of[test_labels]

    def acc(pred: torch.Tensor) -> float:
        return round((pred == y).float().mean().item(), 4)

    head = test_z.argmax(1)
    confusion = accuracy.confusion_matrix(head, y, k)
    probe = linear_probe(pool_f, union_of[pool_labels[:args.pool]], test_f, k)
    centroids = centroid_labels(pool_f, pool_z.softmax(1), test_f)
    names = [FASHION_MNIST_CLASSES[i] for i in class_ids]
    task_of = [task for task, ids in accuracy.SETTINGS[args.setting].items() for _ in ids]
    task_index = torch.tensor([list(accuracy.SETTINGS[args.setting]).index(t) for t in task_of])
    result = {
        "setting": args.setting, "seed": args.seed, "method": args.method, "student_epochs": args.student_epochs,
        "classes": names, "tasks": task_of,
        "head_acc": acc(head),
        "head_wrong_task": round((task_index[head] != task_index[y]).float().mean().item(), 4),
        "linear_probe_acc_with_labels": acc(probe),
        "centroid_acc_per_round": [acc(c) for c in centroids],
        "pool_mean_prediction": {n: round(v, 4) for n, v in zip(names, pool_z.softmax(1).mean(0).tolist())},
        "head_recall": {n: round(confusion[i, i].item() / max(1, confusion[i].sum().item()), 4)
                        for i, n in enumerate(names)},
        "probe_recall": {n: round(((probe == i) & (y == i)).sum().item() / max(1, (y == i).sum().item()), 4)
                         for i, n in enumerate(names)},
        "confusion": confusion.tolist(),
    }
    result |= label_free_readouts(pool_f, pool_z, union_of[pool_labels[:args.pool]], test_f, acc)
    result["batchnorm_gates"] = batchnorm_gates(teachers, pool_images[:args.pool], test_images, test_z, y, names,
                                                task_index, args.setting, acc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.setting}-seed{args.seed}-{args.method.replace('+', '_')}"
    stem += "" if args.preset == "cpu" else f"-{args.preset}"  # the CPU preset's files keep their names
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    confusion_plot(confusion.numpy(), names, task_of, out / f"{stem}.png",
                   title=f"{args.method}, {args.setting} seed {args.seed}: task-agnostic confusion (%, rows: true)")
    for key in ("head_acc", "head_wrong_task", "linear_probe_acc_with_labels", "centroid_acc_per_round",
                "pool_mean_prediction", "head_recall", "probe_recall", "over_cluster_acc",
                "over_cluster_purity_with_labels", "balanced_self_training", "batchnorm_gates"):
        print(f"{key}: {json.dumps(result[key])}")
    print(f"wrote {out / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
