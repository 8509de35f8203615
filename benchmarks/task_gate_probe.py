"""Out-of-task detection from the teachers' own statistics: does it tell which task an image belongs to better
than the amalgamated student already does?

    python benchmarks/task_gate_probe.py --setting S2 --seed 0      # CPU preset, ~5 min on 2 cores

For each teacher and each of its classes, rank the unlabeled pool images the teacher assigns to that class by an
in-task score (the top logit, or minus the Mahalanobis distance of the teacher's pooled features to the class
centre). The pool holds about N/K images of every class, so when a teacher assigns M > N/K images to a class the
M - N/K least in-task of them are out-of-task intruders. A test image's gate score for a teacher is its rank
percentile among the pool images of its predicted class minus that intruder share; the highest score picks the
task. Ranks are only compared inside one teacher and one class, so teachers of different architectures need not
be calibrated against each other. The probe trains the `amalgam` student of benchmarks/accuracy.py on the same
seed and prints, on the test images: task accuracy and task-agnostic accuracy of the gate, of the student, and
of the student's slice masses combined with the gate.

It also tries clustering instead of ranking: k-means with one cluster per union class on the pool, in the
teachers' joint pooled features, in the student's pooled features and in the common feature space (the
student's side of the first common-feature block), each cluster then matched one-to-one to a union class by
how often that class's teacher predicts it inside the cluster (Hungarian assignment).

Last, the headroom of neighbour consistency (`losses.NeighbourConsistency`): each test image's union
prediction is combined with the mean prediction of its k nearest pool images in the teachers' joint pooled
features (log p + log q); if even the trained student's own predictions, smoothed this way, gain little, a
training term built on them cannot gain much more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # the harness: its teachers, student and data

from amalgam.losses import slice_mass  # importable once the harness has put the repo on the path


def gate_scores(pool_scores: torch.Tensor, pool_labels: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                classes: int, expected_per_class: float) -> torch.Tensor:
    """Per image: rank percentile of `scores` among the pool images of the same predicted class, minus the share
    of that class's pool images that must be intruders."""
    out = torch.zeros(len(scores))
    for c in range(classes):
        pool_c = pool_scores[pool_labels == c].sort().values
        here = labels == c
        if len(pool_c) == 0:
            continue
        intruders = max(0.0, (len(pool_c) - expected_per_class) / len(pool_c))
        out[here] = torch.searchsorted(pool_c, scores[here]).float() / len(pool_c) - intruders
    return out


def mahalanobis_scores(pool_feats, pool_logits, feats, logits, expected_per_class):
    """Minus the distance to the predicted class's centre; centres and a shared covariance from the most
    confident expected_per_class pool images of each class (mostly in-task)."""
    pool_labels, labels = pool_logits.argmax(1), logits.argmax(1)
    top_logit = pool_logits.max(1).values
    centres, residuals = [], []
    for c in range(pool_logits.shape[1]):
        rows = (pool_labels == c).nonzero().squeeze(1)
        rows = rows[top_logit[rows].argsort(descending=True)[: int(expected_per_class)]]
        centre = pool_feats[rows].mean(0) if len(rows) else torch.zeros(pool_feats.shape[1])
        centres.append(centre)
        residuals.append(pool_feats[rows] - centre)
    r = torch.cat(residuals)
    precision = torch.linalg.inv(r.T @ r / len(r) + 1e-3 * torch.eye(r.shape[1]))
    centres = torch.stack(centres)

    def score(f, lab):
        d = f - centres[lab]
        return -((d @ precision) * d).sum(1)

    return score(pool_feats, pool_labels), score(feats, labels)


def cluster_accuracy(pool_feats: torch.Tensor, test_feats: torch.Tensor, teacher_pool_logits: list[torch.Tensor],
                     slices: list[tuple[int, int]], test_y: torch.Tensor, seed: int) -> float:
    """Task-agnostic test accuracy of k-means clusters (one per union class) matched one-to-one to classes."""
    classes = slices[-1][1]
    kmeans = KMeans(classes, n_init=4, random_state=seed).fit(pool_feats.numpy())
    pool_cluster, test_cluster = kmeans.labels_, kmeans.predict(test_feats.numpy())
    agreement = np.zeros((classes, classes))  # [cluster, class]: share the class's teacher labels that class
    for (a, b), logits in zip(slices, teacher_pool_logits):
        predicted = logits.argmax(1).numpy()
        for c in range(classes):
            inside = predicted[pool_cluster == c]
            if len(inside):
                agreement[c, a:b] = np.bincount(inside, minlength=b - a) / len(inside)
    clusters, matched = linear_sum_assignment(-agreement)
    class_of = np.empty(classes, dtype=int)
    class_of[clusters] = matched
    return (torch.from_numpy(class_of[test_cluster]) == test_y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="S2", choices=list(A.SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=20000, help="unlabeled training images that set the ranks")
    p.add_argument("--data-root", default=A.DEFAULT_ROOT)
    p.add_argument("--work", default="artifacts/bench-accuracy", help="teacher checkpoints (shared with accuracy.py)")
    args = p.parse_args(argv)
    preset = dict(A.PRESETS["cpu"], root=args.data_root)
    work = Path(args.work) / "cpu"
    work.mkdir(parents=True, exist_ok=True)
    teachers = A.teacher_configs(args.setting, args.seed, preset, work)
    model = A.build_student("amalgam", teachers, preset, args.seed)
    data = A.FashionMNISTDataModule(args.data_root, A.SETTINGS[args.setting], batch_size=preset["batch_size"],
                                    train_limit=preset["train_limit"], seed=args.seed)
    L.seed_everything(args.seed, verbose=False)
    A.trainer(preset["student_epochs"], work).fit(model, datamodule=data)
    model.eval()

    train_x, _ = A.load_fashion_mnist(args.data_root, "train")
    test, y = A.union_test_set(args.setting, args.data_root)
    pool = train_x[: args.pool, None].expand(-1, 3, -1, -1)
    device = torch.device("cpu")

    def logits_and_features(t, x):
        out = t(x)
        return torch.cat([out.logits, out.taps[0].flatten(1)], 1)

    def student_views(x):  # union logits, pooled features, common-space features of the student
        out = model.student(x)
        teachers_out = [t(x) for t in model.teachers]
        common = model.blocks[0](out.taps[0], [t.taps[0] for t in teachers_out]).student
        return torch.cat([out.logits, out.taps[0].flatten(1), common.flatten(1)], 1)

    k_all = model.num_classes
    pool_student, test_student = (A.logits_of(student_views, x, device) for x in (pool, test))
    student = test_student[:, :k_all]
    width = model.student.tap_shapes()[0][0]
    teacher_pool_logits, teacher_pool_feats, teacher_test_feats = [], [], []
    task_of = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(model.slices)])
    true_task = task_of[y]
    expected = args.pool / model.num_classes
    gates = {"top logit": [], "mahalanobis": []}
    for t in model.teachers:
        k = len(t.classes)
        pool_out = A.logits_of(lambda x, t=t: logits_and_features(t, x), pool, device)
        test_out = A.logits_of(lambda x, t=t: logits_and_features(t, x), test, device)
        pool_logits, test_logits = pool_out[:, :k], test_out[:, :k]
        teacher_pool_logits.append(pool_logits)
        teacher_pool_feats.append(F.normalize(pool_out[:, k:], dim=1))
        teacher_test_feats.append(F.normalize(test_out[:, k:], dim=1))
        pool_labels, test_labels = pool_logits.argmax(1), test_logits.argmax(1)
        gates["top logit"].append(gate_scores(pool_logits.max(1).values, pool_labels, test_logits.max(1).values,
                                              test_labels, k, expected))
        pool_m, test_m = mahalanobis_scores(pool_out[:, k:], pool_logits, test_out[:, k:], test_logits, expected)
        gates["mahalanobis"].append(gate_scores(pool_m, pool_labels, test_m, test_labels, k, expected))

    def union_accuracy(task):  # the student's class inside the chosen task's slice
        picked = torch.stack([student[i, a:b].argmax() + a for i, (a, b) in
                              enumerate(model.slices[t] for t in task.tolist())])
        return (picked == y).float().mean().item()

    mass = slice_mass(student.softmax(1), model.slices)
    print(f"\n{args.setting} seed {args.seed}: task accuracy / task-agnostic accuracy on {len(y)} test images")
    print(f"student (argmax of slice mass)       {(mass.argmax(1) == true_task).float().mean():.4f} / "
          f"{union_accuracy(mass.argmax(1)):.4f} (raw argmax {(student.argmax(1) == y).float().mean():.4f})")
    for name, per_teacher in gates.items():
        g = torch.stack(per_teacher, 1)
        student_right, gate_right = mass.argmax(1) == true_task, g.argmax(1) == true_task
        print(f"gate, {name}: share of images given the wrong task by both {(~student_right & ~gate_right).float().mean():.4f}, "
              f"by the student alone {(~student_right & gate_right).float().mean():.4f}, "
              f"by the gate alone {(student_right & ~gate_right).float().mean():.4f}")
        print(f"gate, {name:12s}                {(g.argmax(1) == true_task).float().mean():.4f} / "
              f"{union_accuracy(g.argmax(1)):.4f}")
        for weight in (1.0, 4.0):
            task = (mass.clamp_min(1e-9).log() + weight * g).argmax(1)
            print(f"student + {weight:g} x gate ({name:12s})  {(task == true_task).float().mean():.4f} / "
                  f"{union_accuracy(task):.4f}")

    spaces = {"teachers' joint pooled features": (torch.cat(teacher_pool_feats, 1), torch.cat(teacher_test_feats, 1)),
              "student's pooled features": (pool_student[:, k_all:k_all + width], test_student[:, k_all:k_all + width]),
              "common feature space": (pool_student[:, k_all + width:], test_student[:, k_all + width:])}
    for name, (pool_feats, test_feats) in spaces.items():
        acc = cluster_accuracy(F.normalize(pool_feats, dim=1), F.normalize(test_feats, dim=1), teacher_pool_logits,
                               model.slices, y, args.seed)
        print(f"k-means, {name}: task-agnostic {acc:.4f}")

    pool_p, test_p = pool_student[:, :k_all].softmax(1), student.softmax(1)
    pool_keys, test_keys = (F.normalize(torch.cat(f, 1), dim=1) for f in (teacher_pool_feats, teacher_test_feats))
    nearest = (test_keys @ pool_keys.T).topk(50, dim=1).indices
    for k in (5, 20, 50):
        q = pool_p[nearest[:, :k]].mean(1)
        smoothed = test_p.log() + q.clamp_min(1e-8).log()
        print(f"student x mean of its {k} nearest pool images in the teachers' joint features: task-agnostic "
              f"{(smoothed.argmax(1) == y).float().mean():.4f} (neighbours alone {(q.argmax(1) == y).float().mean():.4f})")


if __name__ == "__main__":
    main()
