"""Training throughput: amalgam's real Lightning step against the paper-style reference, side by side.

    python benchmarks/throughput.py                                   # CPU: case c (sized for 2 cores)
    python benchmarks/throughput.py --channels-last                   # CPU, amalgam with channels-last convs
    python benchmarks/throughput.py --device cuda --bf16 --bf16-teachers --channels-last --compile   # GPU: a, b, c
    python benchmarks/throughput.py --cases a --batch 128 256 --e2e   # plus loader + step from a JPEG folder

On a CPU shared with other work, pass ``--threads 1`` (or set ``OMP_WAIT_POLICY=PASSIVE``): spinning OpenMP
threads that wait for a descheduled sibling made 2-thread steps 20x slower here (benchmarks/RESULTS.md).

Both run in one process on the same weights and batch (``reference_step.ReferenceStep`` copies amalgam's
networks), and alternate in blocks of ``--block`` steps so load changes hit both alike. amalgam runs through
``lightning.Trainer.fit`` with its own ``configure_optimizers``, logging and hooks: the step a user gets.
The reference stays fp32 and eager whatever the flags; the flags configure amalgam.

Writes benchmarks/results/throughput-<device>.json (``cpu``, ``h100``, ``h200``), a contract other scripts
read: {"device", "versions", "rows": [{"case", "batch", "ref_img_s", "amalgam_img_s", "ratio",
"peak_mem_gib", "mfu", ...}]}, and prints the same rows as a Markdown table for benchmarks/RESULTS.md.
Peak memory is the CUDA allocator's peak during amalgam's steps on a GPU, and on CPU the peak resident memory
of a separate process that runs only amalgam's steps (``ref_peak_mem_gib``: the same for the reference).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import lightning as L
import torch
from common import CASES, sync
from reference_step import ReferenceStep, compare

from amalgam.backbones import SmallMapConv2d

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--cases", default=None, help=f"comma-separated, of {sorted(CASES)} (default: c on CPU, "
                                                 f"a,b,c on a GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: each case's own)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of each (default 20 CPU, 50 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each first (default 2, 5 compiled)")
    p.add_argument("--block", type=int, default=None, help="steps per alternation block (default 1 CPU, 5 GPU)")
    p.add_argument("--bf16", action="store_true", help="amalgam under bf16-mixed autocast")
    p.add_argument("--bf16-teachers", action="store_true", help="amalgam with teacher_dtype='bfloat16'")
    p.add_argument("--compile", action="store_true", help="amalgam with compile=True (student, blocks, teachers)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--channels-last", action="store_true", help="amalgam with channels_last=True")
    p.add_argument("--without", nargs="+", default=[], choices=["small-map-conv", "fused-adam"],
                   help="ablation: turn off one of amalgam's speed-ups (SmallMapConv2d on tiny maps, fused Adam)")
    p.add_argument("--nan-check-every", type=int, default=None,
                   help="amalgam's nan_check_every_n_steps (default 1 CPU, 100 GPU: each check syncs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--e2e", action="store_true", help="also time loader + step reading a generated JPEG folder")
    p.add_argument("--workers", type=int, default=None, help="--e2e loader workers (default: half the cores)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-implementation memory processes")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/throughput-<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other (case, batch) pairs already in --out (each row names its command)")
    p.add_argument("--probe", choices=["ref", "amalgam"], help=argparse.SUPPRESS)  # internal: memory process
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    args.cases = (args.cases or ("a,b,c" if gpu else "c")).split(",")
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; known: {sorted(CASES)}")
    args.steps = args.steps or (50 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else 2)
    args.block = args.block or (5 if gpu else 1)
    args.nan_check_every = args.nan_check_every or (100 if gpu else 1)
    return args


def module_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"compile": args.compile, "compile_mode": args.compile_mode, "channels_last": args.channels_last,
            "nan_check_every_n_steps": args.nan_check_every, "evaluate_teachers": False,
            "teacher_dtype": "bfloat16" if args.bf16_teachers else "float32"}


def trainer(args: argparse.Namespace, steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="gpu" if args.device.type == "cuda" else "cpu", devices=1,
                     precision="bf16-mixed" if args.bf16 else "32-true", max_steps=steps, max_epochs=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=callbacks)


class Repeat:
    """The same device batch ``n`` times: the loader of the timed runs (no copy, no host work)."""

    def __init__(self, images: torch.Tensor, n: int) -> None:
        self.images, self.n = images, n

    def __iter__(self):
        return (self.images for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


class Alternate(L.Callback):
    """Inside amalgam's fit: after every ``block`` amalgam steps, ``block`` reference steps; times both.

    An amalgam block runs from one block start to the next, less the reference's time in between, so
    Lightning's own per-step work (hooks, logging, scheduler, fetching the batch) counts against amalgam.
    """

    def __init__(self, reference: ReferenceStep, images: torch.Tensor, block: int, warmup_blocks: int,
                 blocks: int) -> None:
        self.reference, self.images, self.block = reference, images, block
        self.warmup_blocks, self.blocks = warmup_blocks, blocks
        self.amalgam_ms: list[float] = []
        self.ref_ms: list[float] = []
        self.amalgam_peak = self.ref_peak = 0.0  # allocator peaks during each one's steps
        self.amalgam_added = self.ref_added = 0.0  # the same, less what was allocated when the steps began
        self._base = 0.0
        self._start: float | None = None
        self._excluded = 0.0
        self._done = 0  # reference blocks run

    def _timed(self, index: int) -> bool:
        return self.warmup_blocks <= index < self.warmup_blocks + self.blocks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % self.block:
            return
        device = pl_module.device
        sync(device)
        now = time.perf_counter()
        if self._start is not None and self._timed(self._done - 1):
            self.amalgam_ms.append((now - self._start - self._excluded) / self.block * 1e3)
        self._start, self._excluded = now, 0.0
        common.reset_peak(device)
        self._base = common.allocated_gib(device) or 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.block or self._done >= self.warmup_blocks + self.blocks:
            return
        device = pl_module.device
        sync(device)
        t0 = time.perf_counter()
        timed = self._timed(self._done)
        if timed:
            peak = common.peak_gib(device) or 0.0
            self.amalgam_peak = max(self.amalgam_peak, peak)
            self.amalgam_added = max(self.amalgam_added, peak - self._base)
        common.reset_peak(device)
        base = common.allocated_gib(device) or 0.0
        for _ in range(self.block):
            self.reference.step(self.images)
        sync(device)
        if timed:
            self.ref_ms.append((time.perf_counter() - t0) / self.block * 1e3)
            peak = common.peak_gib(device) or 0.0
            self.ref_peak = max(self.ref_peak, peak)
            self.ref_added = max(self.ref_added, peak - base)
        self._done += 1
        self._excluded = time.perf_counter() - t0


def build(args: argparse.Namespace, case: str, batch: int) -> tuple[Any, ReferenceStep, torch.Tensor]:
    module = CASES[case].build(**module_args(args)).to(args.device)
    reference = ReferenceStep(module).to(args.device)
    if "small-map-conv" in args.without:  # teachers are not submodules: visit them too
        for m in [*module.modules(), *(m for t in module.teachers for m in t.modules())]:
            if isinstance(m, SmallMapConv2d):
                m.__class__ = torch.nn.Conv2d
    if "fused-adam" in args.without:
        module.optimizer_factory = torch.optim.Adam
    size = CASES[case].image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(args.device)
    return module, reference, images


def agreement(module, reference: ReferenceStep, images: torch.Tensor) -> float:
    """Largest relative difference of a loss term, fp32 and without TF32, on up to 16 of the images."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return max(compare(module, reference, images[:16]).values())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def flops_per_image(reference: ReferenceStep, images: torch.Tensor) -> float:
    """Model FLOPs of one step per image: teacher forwards, student and block forward + backward (counted on
    the reference, which does the same network work; optimizer and elementwise work are not FLOPs here)."""
    sub = images[:16]

    def step() -> None:
        sum(reference.weights[k] * v for k, v in reference.loss_terms(sub).items()).backward()

    flops = common.count_flops(step)
    for p in reference.parameters():
        p.grad = None
    return flops / sub.shape[0]


def measure(args: argparse.Namespace, case: str, batch: int) -> dict[str, Any]:
    module, reference, images = build(args, case, batch)
    rel = agreement(module, reference, images)
    flops = flops_per_image(reference, images)
    blocks = max(1, -(-args.steps // args.block))
    warmup_blocks = -(-args.warmup // args.block)
    alternate = Alternate(reference, images, args.block, warmup_blocks, blocks)
    total = (warmup_blocks + blocks) * args.block + 1  # one more step closes the last block's clock
    trainer(args, total, [alternate]).fit(module, train_dataloaders=Repeat(images, total))
    ref_ms, amalgam_ms = statistics.median(alternate.ref_ms), statistics.median(alternate.amalgam_ms)
    row = {"case": case, "batch": batch, "ref_img_s": round(batch / ref_ms * 1e3, 1),
           "amalgam_img_s": round(batch / amalgam_ms * 1e3, 1), "ratio": round(ref_ms / amalgam_ms, 3),
           "peak_mem_gib": None, "mfu": None, "ref_peak_mem_gib": None, "step_mem_gib": None,
           "ref_step_mem_gib": None,
           "flops_per_img": flops, "ref_ms": round(ref_ms, 2), "amalgam_ms": round(amalgam_ms, 2),
           "ref_ms_all": [round(t, 1) for t in alternate.ref_ms],
           "amalgam_ms_all": [round(t, 1) for t in alternate.amalgam_ms],
           "max_rel_diff_fp32": rel, "steps": len(alternate.amalgam_ms) * args.block,
           "bf16": args.bf16, "bf16_teachers": args.bf16_teachers, "compile": args.compile,
           "compile_mode": args.compile_mode, "channels_last": args.channels_last,
           "without": args.without, "threads": torch.get_num_threads()}
    if args.device.type == "cuda":
        row |= {"peak_mem_gib": round(alternate.amalgam_peak, 3), "ref_peak_mem_gib": round(alternate.ref_peak, 3),
                "step_mem_gib": round(alternate.amalgam_added, 3), "ref_step_mem_gib": round(alternate.ref_added, 3)}
    if args.e2e:
        row |= end_to_end(args, module, case, batch)
    return row


# ------------------------------------------------------------------------------------------------------------
# Memory on CPU: one process per implementation, its peak resident memory

def probe(args: argparse.Namespace) -> None:
    case, batch = args.cases[0], args.batch[0]
    module, reference, images = build(args, case, batch)
    steps = args.warmup + 2
    fit = trainer(args, steps, [])  # built before the baseline: Lightning's own objects are not step memory
    module.configure_model()  # and so is the one-off channels-last copy of the weights (fit repeats it: no-op)
    base = common.rss_gib()
    if args.probe == "ref":
        del module
        for _ in range(steps):
            reference.step(images)
    else:
        del reference
        fit.fit(module, train_dataloaders=Repeat(images, steps))
    peak = common.peak_rss_gib()
    print("PROBE " + json.dumps({"peak": round(peak, 3), "added": round(max(0.0, peak - base), 3)}))


def memory_probes(args: argparse.Namespace, case: str, batch: int, argv: list[str]) -> dict[str, float]:
    peaks = {}
    keep = [a for a in argv if a != "--e2e"]
    for impl in ("ref", "amalgam"):
        cmd = [sys.executable, __file__, *keep, "--cases", case, "--batch", str(batch), "--probe", impl]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
        if line is None:
            raise RuntimeError(f"memory process for {impl} failed:\n{out.stderr[-3000:]}")
        peaks[impl] = json.loads(line[6:])
    return {"peak_mem_gib": peaks["amalgam"]["peak"], "ref_peak_mem_gib": peaks["ref"]["peak"],
            "step_mem_gib": peaks["amalgam"]["added"], "ref_step_mem_gib": peaks["ref"]["added"]}


# ------------------------------------------------------------------------------------------------------------
# End to end: JPEG files -> loader workers (decode to uint8) -> device crop/flip -> amalgam step

def jpeg_folder(side: int, count: int) -> Path:
    """``count`` smooth random JPEGs of ``side`` px, made once and kept in the temp folder."""
    from PIL import Image

    folder = Path(tempfile.gettempdir()) / f"amalgam-throughput-jpegs-{side}-{count}"
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand(1, 3, 8, 8, generator=g)  # low-frequency content, like a photo, not pure noise
        image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
        image = (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(0, 1)[0]
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


class Stamps(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sync(pl_module.device)
        self.times.append(time.perf_counter())


def end_to_end(args: argparse.Namespace, module, case: str, batch: int) -> dict[str, Any]:
    import os

    from amalgam.data import ImageFolderDataModule

    size = CASES[case].image_size
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) // 2)
    steps = args.warmup + args.steps
    folder = jpeg_folder(size + size // 7, batch * (steps + 1))  # a little larger: the loader resizes
    data = ImageFolderDataModule(str(folder), image_size=size, batch_size=batch, num_workers=workers)
    stamps = Stamps()
    trainer(args, steps, [stamps]).fit(module, datamodule=data)
    timed = stamps.times[args.warmup:]
    rate = batch * (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None
    return {"e2e_img_s": round(rate, 1) if rate else None, "e2e_workers": workers}


# ------------------------------------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]) -> str:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    head = ("| case | batch | ref img/s | amalgam img/s | ratio | peak mem GiB (amalgam / ref) | "
            "added by steps GiB (amalgam / ref) | GFLOP/img | MFU | e2e img/s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['case']} | {r['batch']} | {f(r['ref_img_s'])} | {f(r['amalgam_img_s'])} | "
             f"{f(r['ratio'], '.2f')}x | {f(r['peak_mem_gib'], '.2f')} / {f(r['ref_peak_mem_gib'], '.2f')} | "
             f"{f(r['step_mem_gib'], '.3f')} / {f(r['ref_step_mem_gib'], '.3f')} | "
             f"{f(r['flops_per_img'] / 1e9, '.2f')} | {f(r['mfu'], '.1%')} | {f(r.get('e2e_img_s'))} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")  # eval-mode teachers, no val loop, few workers
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the agreement check runs outside a Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both implementations run in this process: fair to both
    if args.probe:
        return probe(args)
    result = {"device": common.device_label(args.device), "device_name": common.device_name(args.device),
              "versions": common.versions(), "command": "python benchmarks/throughput.py " + shlex.join(argv),
              "threads": torch.get_num_threads(), "started": common.timestamp(),
              "load_average_start": common.load_average(),
              "bf16_matmul_tflops": common.bf16_matmul_tflops(args.device), "rows": []}
    ceiling = result["bf16_matmul_tflops"]
    if ceiling:
        print(f"bf16 matmul ceiling: {ceiling} TFLOP/s", flush=True)
    out = args.out or RESULTS / f"throughput-{result['device']}.json"
    kept = json.loads(out.read_text())["rows"] if args.merge and out.exists() else []

    def save() -> list[dict[str, Any]]:  # after every row: a case that fails or a stopped run keeps the others
        new = {(r["case"], r["batch"]) for r in result["rows"]}
        rows = sorted([r for r in kept if (r["case"], r["batch"]) not in new] + result["rows"],
                      key=lambda r: (r["case"], r["batch"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result | {"rows": rows}, indent=1) + "\n")
        return rows

    for case in args.cases:
        for batch in args.batch or CASES[case].batches:
            load = common.load_average()
            row = measure(args, case, batch) | {"command": result["command"], "load_average": load}
            if ceiling:
                row["mfu"] = round(row["flops_per_img"] * row["amalgam_img_s"] / (ceiling * 1e12), 4)
            if args.device.type == "cpu" and not args.no_memory:
                row |= memory_probes(args, case, batch, _without(argv, ("--cases", "--batch", "--out")))
            result["rows"].append(row)
            save()
            print(table([row]).splitlines()[-1], flush=True)
    result["load_average_end"] = common.load_average()
    result["rows"] = save()  # with --merge, the earlier rows too
    print(f"\n{result['device_name']}, torch {torch.__version__}, {result['threads']} threads, load average "
          f"{result['load_average_start']} -> {result['load_average_end']}\n{table(result['rows'])}\nwrote {out}")
    return result


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less the given options and their values."""
    kept, skip = [], False
    for a in argv:
        if a in options:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        kept.append(a)
    return kept


if __name__ == "__main__":
    main()
