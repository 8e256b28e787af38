"""Regenerate a dataset's data-free table (every method on one teacher, the same budgets and hardware) with one
command; the rows are declared as data (:data:`DATASETS`), so a method's row is one entry.

    ZSKD_DATA_ROOT=../shared/data python benchmarks/table.py --dataset mnist [--rows zskd ci ...] [--seeds 0 1 2]
        [--schedule fast]

Every row runs the ``zskd`` CLI on shipped configs with command-line overrides (printed in the table, so each
row can be rerun by hand), reads the final (last-epoch) test accuracy from its output, and the synthesis wall
time from the impression cache's manifest (online rows: from the driver's last log line). Results accumulate
in ``benchmarks/results/<dataset>.csv`` (rows already measured with the same command and configs are skipped,
so an interrupted run resumes; a row killed while distilling goes on from its last epoch checkpoint,
:mod:`interrupted_runs`); ``<dataset>.md``, ``<dataset>.png`` (accuracy against budget) and
``<dataset>_time.png`` (accuracy against wall time) are rebuilt from the CSV after every row.

``--schedule paper`` synthesizes with the ZSKD paper's procedure (uniform noise, 1500 iterations at lr 0.01, no
prior, no jitter); ``fast`` with the shipped configs' recipe. The teacher row's seed ``teacher_seed`` (its
config's own seed) trains the teacher every other row loads; its other seeds measure the recipe's spread and
save no checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import interrupted_runs
from interrupted_runs import Resumption
from watched import run_watched
from zskd_lightning.files import write_atomic, write_csv_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ["row", "method", "impressions", "seed", "test_acc", "teacher_acc", "synthesis_s", "total_s", "hardware", "command",
          "configs_sha", "training_s", "commit"]
#: The first commit whose teacher holds no subnormal weights (FrozenTeacher sets them to zero): rows measured
#: before it (no ``commit`` recorded) timed the teacher's passes several times slower on CPU.
SUBNORMAL_FIX = "305d75a"
#: The first commit whose offline and real-data training loaders draw their order and per-sample transforms from
#: keys ``(seed, epoch, index)`` (``zskd_lightning.data.epoch_order``): rows of those kinds measured before it
#: read torch's shuffled order, which a re-run of their command no longer draws (online rows are unaffected).
KEYED_ORDER = "06914e4"
#: The first commit whose SSD-KD diversity part counts the replay buffer's entries by the teacher's predicted
#: class (the method's "samples predicted as the same class"): online rows whose modulating function has the
#: diversity part on, measured before it, counted the classes the entries were made for.
DIVERSITY_FIX = "54f60e3"
#: Online rows synthesize during distillation; their log line gives the inputs made and the synthesis time.
ONLINE_LINE = re.compile(r"Online synthesis: \d+ rounds, (\d+) inputs synthesized in ([0-9.]+) s")
#: ZSKD's paper schedule (``--schedule paper``): the synthesizer arguments it overrides.
PAPER_SYNTHESIS = {"iterations": "1500", "lr": "0.01", "init": "uniform", "regularizers": "[]", "jitter": "0"}


@dataclass(frozen=True)
class Row:
    """One row of a table: what runs for each seed.

    ``kind``: ``teacher`` (trains the teacher every other row loads), ``real`` (a student on real data),
    ``data_free`` (impressions cached, then distillation: ``budget`` impressions) or ``online`` (synthesis during
    distillation; the budget is read from the run). ``configs``: the ``--config`` files in order (a base, then
    overlays); ``extra``: further CLI arguments; ``variant``: a suffix that keeps a data-free row's folders apart
    from another row of the same method and budget. ``impressions_variant``: the ``variant`` whose impression
    caches this row reads (a row that changes only the distillation shares them; ``None``: its own).
    ``paper``: the published accuracy (%) to print beside it.
    ``legend``: the row's label in the accuracy-against-time figure (``None``: not drawn). ``default``: run
    without ``--rows``. ``paper_schedule``: ``--schedule paper`` runs this data-free row with ZSKD's paper
    synthesis (False for a method whose config already holds its authors' settings). ``prepare``: (a file the
    row reads, the ``zskd`` arguments that write it), run first when the file is missing.
    """

    name: str
    method: str
    kind: str
    configs: tuple[str, ...]
    budget: int = 0
    extra: tuple[str, ...] = ()
    variant: str = ""
    impressions_variant: str | None = None
    paper: float | None = None
    legend: str | None = None
    default: bool = True
    paper_schedule: bool = True
    prepare: tuple[str, str] | None = None


@dataclass(frozen=True)
class Dataset:
    """A table: its teacher, its rows and what is printed around them (``name``: file stem, ``label``: in prose).

    ``data_tag`` names the training data the rows were measured on (part of every row's fingerprint).
    ``teacher_ckpt`` is what ``teacher_config`` writes; ``teacher_file``, when set, the committed copy of it
    (``benchmarks/teachers/``) that the students' configs load.
    ``ablation_budgets`` x ``ablation_rows``: data-free rows re-run at each budget on the first seed (the figure
    of accuracy against budget); the row's own budget is that row itself. ``target``: (method, accuracy %) of
    the time-to-accuracy line.
    """

    name: str
    label: str
    title: str
    data_tag: str
    teacher_config: str
    teacher_ckpt: str
    teacher_seed: int
    rows: tuple[Row, ...]
    teacher_file: str = ""
    notes: tuple[str, ...] = ()
    references: str = ""
    ablation_budgets: tuple[int, ...] = ()
    ablation_rows: tuple[str, ...] = ()
    target: tuple[str, float] | None = None

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def declared(self, name: str) -> Row | None:
        """The declared row that a table row ``name`` (or its paper-schedule twin ``<row>_paper``) measures;
        None for rows not declared as data (the ablation)."""
        return next((r for r in self.rows if name in (r.name, f"{r.name}_paper")), None)

    @property
    def row_order(self) -> tuple[str, ...]:
        """Rows in table order: each declared row, then its paper-schedule twin; the ablation last."""
        names = [n for r in self.rows for n in (r.name, f"{r.name}_paper")]
        return (*names, "ablation", "ablation_paper")

    @property
    def timed_rows(self) -> dict[str, str]:
        return {r.name: r.legend for r in self.rows if r.legend}


LOPES = "configs/mnist/lopes_lenet5_half.yaml"  # the authors' settings, spectral layer pairs (overlays: the others)
LOPES_FAST = "configs/mnist/lopes/fast.yaml"  # the faster recipe, on top of LOPES and a variant
LOPES_RECORD = ("runs/mnist/lopes/lenet5.metadata.safetensors", "record --config configs/mnist/lopes_record.yaml")
SSDKD = "configs/mnist/ssdkd_lenet5_half.yaml"  # SSD-KD, uniform sampling (overlays: the ablations)
SSDKD_PRIORITY = "configs/mnist/ssdkd/priority.yaml"
SSDKD_NO_PHI = "configs/mnist/ssdkd/no_phi.yaml"
SSDKD_60_EPOCHS = "configs/mnist/ssdkd/epochs60.yaml"
WANG_900_ITERATIONS = "configs/mnist/wang/iterations900.yaml"  # three times the synthesis steps
WANG_240_EPOCHS = "configs/mnist/wang/epochs240.yaml"  # twice the distillation epochs
ZSKD_CIFAR_180_EPOCHS = "configs/cifar10/zskd/epochs180.yaml"  # three times CIFAR-10 ZSKD's distillation epochs
WANG_CIFAR_180_EPOCHS = "configs/cifar10/wang/epochs180.yaml"  # Wang at ZSKD's 180-epoch schedule
WANG_LR_3E3 = "configs/mnist/wang/lr3e-3.yaml"  # distilled at Adam lr 3e-3
WANG_1500_ITERATIONS = "configs/mnist/wang/iterations1500.yaml"  # five times the synthesis iterations
ZSKD_JITTER2 = "configs/mnist/zskd/jitter2.yaml"  # ZSKD's impressions rolled by up to 2 pixels each synthesis step
WANG_JITTER2 = "configs/mnist/wang/jitter2.yaml"  # impressions rolled by up to 2 pixels each synthesis step
BF16_SYNTHESIS = ("--data.init_args.synthesizer.init_args.precision", "bf16-mixed")
MNIST_PAPER = {"teacher": 99.34, "student_ce": 98.92, "student_kd": 99.25, "zskd": 98.77, "lopes": 92.47}
MNIST = Dataset(
    name="mnist",
    label="MNIST",
    title="LeNet-5 -> LeNet-5-half",
    #: Rows of the 17,435-image MNIST this machine held before carry no such tag: stale (dropped from the CSV).
    data_tag="mnist-60000",
    teacher_config="configs/mnist/teacher_lenet5.yaml",
    teacher_ckpt="runs/mnist/teacher_lenet5/last.ckpt",  # written by teacher_config
    teacher_seed=0,
    teacher_file="benchmarks/teachers/mnist_lenet5.safetensors",  # written from teacher_ckpt (benchmarks/teachers.py)
    rows=(
        Row("teacher", "ce-real", "teacher", ("configs/mnist/teacher_lenet5.yaml",), paper=99.34),
        Row("student_ce", "ce-real", "real", ("configs/mnist/student_ce_lenet5_half.yaml",),
            extra=("--trainer.callbacks", "[]"), paper=98.92),
        Row("student_kd", "kd-real", "real", ("configs/mnist/kd_real_lenet5_half.yaml",), paper=99.25),
        Row("zskd", "zskd", "data_free", ("configs/mnist/zskd_lenet5_half_fast.yaml",), 24000, paper=98.77,
            legend="ZSKD, 24,000 impressions"),
        Row("zskd_jitter2", "zskd", "data_free", ("configs/mnist/zskd_lenet5_half_fast.yaml", ZSKD_JITTER2), 24000,
            variant="_jitter2", paper=98.77, default=False),
        Row("zskd_bf16", "zskd", "data_free", ("configs/mnist/zskd_lenet5_half_fast.yaml",), 24000,
            extra=BF16_SYNTHESIS, variant="_bf16", paper=98.77,
            default=False),
        Row("ci", "ci", "data_free", ("configs/mnist/ci_lenet5_half.yaml",), 24000),
        #: Wang 2021 (AAAI), its own MNIST table: Wang 99.08, KD on real data 99.18.
        Row("wang", "wang", "data_free", ("configs/mnist/wang_lenet5_half.yaml",), 24000, paper=99.08,
            legend="Wang 2021, 24,000 impressions"),
        Row("wang_240ep", "wang", "data_free", ("configs/mnist/wang_lenet5_half.yaml", WANG_240_EPOCHS), 24000,
            variant="_240ep", impressions_variant="", paper=99.08, default=False),
        Row("wang_its900", "wang", "data_free", ("configs/mnist/wang_lenet5_half.yaml", WANG_900_ITERATIONS), 24000,
            variant="_its900", paper=99.08, legend="Wang 2021, 900 iterations"),
        Row("wang_its900_240ep", "wang", "data_free",
            ("configs/mnist/wang_lenet5_half.yaml", WANG_900_ITERATIONS, WANG_240_EPOCHS), 24000,
            variant="_its900_240ep", impressions_variant="_its900", paper=99.08, default=False),
        Row("wang_its900_lr3e-3", "wang", "data_free",
            ("configs/mnist/wang_lenet5_half.yaml", WANG_900_ITERATIONS, WANG_LR_3E3), 24000,
            variant="_its900_lr3e-3", impressions_variant="_its900", paper=99.08, default=False),
        Row("wang_its1500", "wang", "data_free", ("configs/mnist/wang_lenet5_half.yaml", WANG_1500_ITERATIONS), 24000,
            variant="_its1500", paper=99.08, default=False),
        Row("wang_jitter2", "wang", "data_free", ("configs/mnist/wang_lenet5_half.yaml", WANG_JITTER2), 24000,
            variant="_jitter2", paper=99.08, default=False),
        Row("wang_jitter2_240ep", "wang", "data_free",
            ("configs/mnist/wang_lenet5_half.yaml", WANG_JITTER2, WANG_240_EPOCHS), 24000,
            variant="_jitter2_240ep", impressions_variant="_jitter2", paper=99.08, default=False),
        # Lopes et al. 2017 from the teacher's activation metadata (recorded first: LOPES_RECORD), beside the
        # authors' numbers: the faster recipe (LOPES_FAST) at the ZSKD rows' budget, and the authors' settings
        # (64,000 impressions of 1,000 steps: about 1.5-2.2 hours of synthesis a variant on 2 CPU cores; not default).
        *(Row(f"lopes_{name}{suffix}", "lopes", "data_free", (LOPES, *overlay, *fast), budget,
              variant=f"_{objective}", paper=paper, default=bool(fast), paper_schedule=False, prepare=LOPES_RECORD,
              legend=f"Lopes {objective.replace('_', ' ')}, 24,000 impressions" if fast and name == "all" else None)
          for name, objective, overlay, paper in (
              ("top", "top_layer", ("configs/mnist/lopes/top_layer.yaml",), 77.30),
              ("all", "all_layers", ("configs/mnist/lopes/all_layers.yaml",), 85.61),
              ("spectral_all", "spectral_all_layers", ("configs/mnist/lopes/spectral_all_layers.yaml",), 90.28),
              ("spectral_pairs", "spectral_layer_pairs", (), 92.47))
          for suffix, fast, budget in (("", (LOPES_FAST,), 24000), ("_authors", (), 64000))),
        # online rows: SSD-KD at 10% of MNIST (a 6,000-input buffer, as the baseline's) with uniform sampling (chosen
        # on the validation split), SSD-KD with the paper's priority sampling (every part built here), their
        # ablations, and at 1%
        Row("fast", "fast", "online", ("configs/mnist/fast_lenet5_half.yaml",), legend="online baseline (10%)"),
        Row("ssdkd", "ssd_kd", "online", (SSDKD,), legend="SSD-KD (10%)"),
        Row("ssdkd_priority", "ssd_kd", "online", (SSDKD, SSDKD_PRIORITY), legend="SSD-KD, priority sampling (10%)"),
        Row("ssdkd_priority_no_phi", "ssd_kd", "online", (SSDKD, SSDKD_NO_PHI, SSDKD_PRIORITY)),
        # both parts off: the online baseline's terms at SSD-KD's schedule (a quarter of the rounds)
        Row("ssdkd_off", "ssd_kd", "online", (SSDKD, SSDKD_NO_PHI)),
        # three times the epochs (and rounds), for the ZSKD 24,000-impression row's time rather than half the baseline's
        Row("ssdkd_60ep", "ssd_kd", "online", (SSDKD, SSDKD_60_EPOCHS), legend="SSD-KD, 60 epochs (10%)"),
        Row("ssdkd_priority_60ep", "ssd_kd", "online", (SSDKD, SSDKD_PRIORITY, SSDKD_60_EPOCHS),
            legend="SSD-KD, priority sampling, 60 epochs (10%)"),
        Row("ssdkd_1pct", "ssd_kd", "online", (SSDKD,),
            extra=("--data.init_args.buffer_size", "600"), legend="SSD-KD (1%)"),
        # the two online recipes with bf16 synthesis (generator, teacher and student of each round; AMX CPUs, GPUs)
        *(Row(f"{name}_bf16", method, "online", (config,), extra=BF16_SYNTHESIS, legend=f"{legend}, bf16 synthesis")
          for name, method, config, legend in (
              ("fast", "fast", "configs/mnist/fast_lenet5_half.yaml", "online baseline (10%)"),
              ("ssdkd", "ssd_kd", SSDKD, "SSD-KD (10%)"))),
    ),
    notes=(
        "MNIST test set (never used for selection). The teacher and the real-data students train on the official",
        "60,000 training images less a 10% validation split; every row also gives the ratio student / teacher.",
    ),
    references=(f"Paper (Nayak et al. 2019, Table 1): teacher {MNIST_PAPER['teacher']}, Student-CE "
                f"{MNIST_PAPER['student_ce']}, Student-KD {MNIST_PAPER['student_kd']}, Lopes et al. {MNIST_PAPER['lopes']}, "
                f"ZSKD {MNIST_PAPER['zskd']}; target ratio {MNIST_PAPER['zskd'] / MNIST_PAPER['teacher']:.4f}. "
                "Wang 2021 (AAAI): 99.08 against KD on real data 99.18."),
    ablation_budgets=(600, 3000, 6000, 12000, 24000),  # 1%, 5%, 10%, 20%, 40% of MNIST's 60,000
    ablation_rows=("zskd", "ci"),
    target=("zskd", 98.5),  # the time-to-accuracy goal (%), from a trained teacher to the student
)

#: The overlay that fits a CIFAR-10 online row into a CPU session (7 epochs x 200 steps).
CIFAR_ONLINE_BUDGET = "configs/cifar10/online/cpu_budget.yaml"
#: A longer one, 10 epochs x 400 steps (about 2 hours of SSD-KD on 2 cores: one session's compute).
CIFAR_ONLINE_SESSION = "configs/cifar10/online/cpu_session.yaml"
#: FastDFKD's BatchNorm memory (``batchnorm_momentum: 0.9``), chosen on the validation split.
CIFAR_BN_MEMORY = "configs/cifar10/online/bn_memory.yaml"

CIFAR10 = Dataset(
    name="cifar10",
    label="CIFAR-10",
    title="AlexNet -> AlexNet-half",
    data_tag="cifar10-50000",
    teacher_config="configs/cifar10/teacher_alexnet.yaml",
    teacher_ckpt="runs/cifar10/teacher_alexnet/last.ckpt",  # written by teacher_config
    teacher_seed=0,
    teacher_file="benchmarks/teachers/cifar10_alexnet.safetensors",  # written from teacher_ckpt (benchmarks/teachers.py)
    rows=(
        Row("teacher", "ce-real", "teacher", ("configs/cifar10/teacher_alexnet.yaml",), paper=83.03),
        Row("student_ce", "ce-real", "real", ("configs/cifar10/student_ce_alexnet_half.yaml",),
            extra=("--trainer.callbacks", "[]"), paper=80.04),
        Row("student_kd", "kd-real", "real", ("configs/cifar10/kd_real_alexnet_half.yaml",), paper=80.08),
        # The CPU budget (2 cores): 4,000 impressions (about 30 min each for synthesis plus distillation; the
        # paper's 40,000 x 1,500 is 16-28 hours here) and online rows at 7 epochs x 200 steps (cpu_budget.yaml).
        Row("zskd", "zskd", "data_free", ("configs/cifar10/zskd_alexnet_half.yaml",), 4000, paper=69.56,
            legend="ZSKD, 4,000 impressions"),
        Row("zskd_180ep", "zskd", "data_free", ("configs/cifar10/zskd_alexnet_half.yaml", ZSKD_CIFAR_180_EPOCHS), 4000,
            variant="_180ep", impressions_variant="", paper=69.56, legend="ZSKD, 4,000 impressions, 180 epochs",
            default=False),
        Row("ci", "ci", "data_free", ("configs/cifar10/ci_alexnet_half.yaml",), 4000),
        Row("wang", "wang", "data_free", ("configs/cifar10/wang_alexnet_half.yaml",), 4000, paper=73.91,
            legend="Wang 2021, 4,000 impressions"),
        Row("wang_180ep", "wang", "data_free", ("configs/cifar10/wang_alexnet_half.yaml", WANG_CIFAR_180_EPOCHS), 4000,
            variant="_180ep", impressions_variant="", paper=73.91, legend="Wang 2021, 4,000 impressions, 180 epochs",
            default=False),
        Row("fast", "fast", "online", ("configs/cifar10/fast_alexnet_half.yaml", CIFAR_ONLINE_BUDGET),
            legend="online baseline"),
        Row("ssdkd", "ssd_kd", "online", ("configs/cifar10/ssdkd_alexnet_half.yaml", CIFAR_ONLINE_BUDGET),
            legend="SSD-KD"),
        Row("fast_bnmem", "fast", "online", ("configs/cifar10/fast_alexnet_half.yaml", CIFAR_ONLINE_BUDGET,
                                             CIFAR_BN_MEMORY), legend="online baseline, BatchNorm memory",
            default=False),
        Row("ssdkd_bnmem", "ssd_kd", "online", ("configs/cifar10/ssdkd_alexnet_half.yaml", CIFAR_ONLINE_BUDGET,
                                                CIFAR_BN_MEMORY), legend="SSD-KD, BatchNorm memory", default=False),
        Row("ssdkd_session", "ssd_kd", "online", ("configs/cifar10/ssdkd_alexnet_half.yaml", CIFAR_ONLINE_SESSION),
            legend="SSD-KD, 10 x 400 steps", default=False),
        # The online baseline at the same 10 x 400 steps: SSD-KD's matched comparison at the session budget.
        Row("fast_session", "fast", "online", ("configs/cifar10/fast_alexnet_half.yaml", CIFAR_ONLINE_SESSION),
            legend="online baseline, 10 x 400 steps", default=False),
        # SSD-KD at its config's own schedule, 20 x 400 steps (5.7x the CPU budget's; about 4 hours on 2 cores,
        # over two sessions: the runner resumes it from its last epoch checkpoint, generator and buffer included).
        Row("ssdkd_schedule", "ssd_kd", "online", ("configs/cifar10/ssdkd_alexnet_half.yaml",),
            legend="SSD-KD, its config's 20 x 400 steps", default=False),
    ),
    notes=(
        "CIFAR-10 test set (never used for selection). The teacher and the real-data students train on the official",
        "50,000 training images less a 10% validation split; every row also gives the ratio student / teacher.",
    ),
    references=("Paper (Nayak et al. 2019, Table 2): teacher 83.03, Student-CE 80.04, Student-KD 80.08, ZSKD 69.56 "
                "(ratio 0.838). Wang 2021 (AAAI): 73.91 (ratio 0.890)."),
)

DATASETS = {d.name: d for d in (MNIST, CIFAR10)}


#: a copy of the working tree without ``.git`` (a lent GPU machine) names its commit here
COMMIT_VARIABLE = "ZSKD_CODE_COMMIT"
#: a record's commit where neither git nor :data:`COMMIT_VARIABLE` names one: not "before every fix"
UNKNOWN_COMMIT = "unknown"


def code_commit() -> str:
    """Short hash of the checked-out commit, ``+local`` when the library or configs differ from it; without git,
    the ``ZSKD_CODE_COMMIT`` variable, else :data:`UNKNOWN_COMMIT`. (Records of the runner before it kept
    commits have none: "".)"""
    if os.environ.get(COMMIT_VARIABLE):
        return os.environ[COMMIT_VARIABLE]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        local = subprocess.run(["git", "status", "--porcelain", "--", "zskd_lightning", "configs"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN_COMMIT
    return head + ("+local" if local else "")


def device_kind(hardware: str) -> str:
    """``"CPU"`` for a record's CPU hardware (``CPU x2 (AMD EPYC)``), else the hardware itself (a GPU's name): the
    table pools seeds of one kind only, so a GPU seed's times never average with a CPU seed's."""
    return "CPU" if hardware.startswith("CPU") else hardware


def group_hardware(group: list[dict[str, str]]) -> str:
    """The hardware of a row's seeds: one name when they share it, else each with its seeds
    (``CPU x2 (x86_64): 0; CPU x2 (AMD EPYC): 1,2``)."""
    seeds: dict[str, list[str]] = {}
    for record in group:
        seeds.setdefault(record["hardware"], []).append(record["seed"])
    if len(seeds) == 1:
        return next(iter(seeds))
    return "; ".join(f"{name}: {','.join(numbers)}" for name, numbers in seeds.items())


def hardware() -> str:
    """The device a row ran on: the GPU's name, or the CPU's core count and model (Linux names the model in
    ``/proc/cpuinfo``; elsewhere the architecture stands in)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU x{os.cpu_count()} ({cpu_model() or platform.machine()})"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first ``model name`` of ``cpuinfo`` ("AMD EPYC", "Intel(R) Xeon(R) ..."), or "" without one."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name") and ":" in line]
    return names[0].replace(",", " ") if names else ""


def row_commands(dataset: Dataset, rows: list[str], seeds: list[int], schedule: str) -> list[tuple[str, str, int, int, list[str]]]:
    """(row, method, impressions, seed, zskd arguments) for every requested measurement, seed by seed in the
    dataset's row order, then the ablation.

    Rows of the paper schedule are named ``<row>_paper`` so they never average with the fast schedule's.
    """
    synth = [] if schedule == "fast" else [
        arg for key, value in PAPER_SYNTHESIS.items() for arg in (f"--data.init_args.synthesizer.init_args.{key}", value)
    ]
    suffix = "" if schedule == "fast" else "_paper"
    table = f"runs/{dataset.name}/table"

    def configs(row: Row) -> list[str]:
        return [arg for config in row.configs for arg in ("--config", config)]

    def data_free(row: Row, n: int, seed: int, name: str) -> tuple[str, str, int, int, list[str]] | None:
        if schedule == "paper" and not row.paper_schedule:
            return None
        folder = f"{row.method}{row.variant}_{schedule}_{n}_s{seed}"
        impressions = row.variant if row.impressions_variant is None else row.impressions_variant
        cache = f"{row.method}{impressions}_{schedule}_{n}_s{seed}"
        return (name + suffix, row.method, n, seed, ["fit", *configs(row), "--seed_everything", str(seed),
                "--data.init_args.num_impressions", str(n), "--data.init_args.seed", str(seed),
                "--data.init_args.cache_dir", f"runs/{dataset.name}/impressions/{cache}",
                "--trainer.default_root_dir", f"{table}/{folder}", *synth, *row.extra])

    plans = []
    for seed in seeds:
        for row in dataset.rows:
            if row.name not in rows:
                continue
            if row.kind == "teacher" and seed == dataset.teacher_seed:  # the checkpoint every student loads
                plans.append((row.name, row.method, 0, seed, ["fit", *configs(row)]))
            elif row.kind == "teacher":  # no checkpoint: the students' teacher stays the one of teacher_seed
                plans.append((row.name, row.method, 0, seed, ["fit", *configs(row), "--seed_everything", str(seed),
                              "--trainer.default_root_dir", f"{table}/{row.name}_s{seed}", "--trainer.callbacks", "[]"]))
            elif row.kind == "real":
                plans.append((row.name, row.method, 0, seed, ["fit", *configs(row), "--seed_everything", str(seed),
                              "--trainer.default_root_dir", f"{table}/{row.name}_s{seed}", *row.extra]))
            elif row.kind == "data_free":
                plan = data_free(row, row.budget, seed, row.name)
                plans += [plan] if plan else []
            elif row.kind == "online":  # "impressions" becomes the number of inputs the run synthesized
                plans.append((row.name, row.method, 0, seed, ["fit", *configs(row), "--seed_everything", str(seed),
                              "--data.init_args.seed", str(seed), "--trainer.default_root_dir",
                              f"{table}/{row.name}_s{seed}", *row.extra]))
            else:
                raise ValueError(f"row {row.name!r} has kind {row.kind!r}; expected teacher, real, data_free or online")
    if "ablation" in rows:
        for n in dataset.ablation_budgets:
            for row in map(dataset.row, dataset.ablation_rows):
                # the row's own budget is the headline row itself: measured (and stored) once, as that row.
                plan = data_free(row, n, seeds[0], row.name if n == row.budget else "ablation")
                if plan and plan not in plans:
                    plans.append(plan)
    return plans


def configs_sha(dataset: Dataset, args: list[str]) -> str:
    """Fingerprint of what a row measures: its configs, the data (``dataset.data_tag``) and, for a row that loads
    the teacher, the teacher's config.

    Configs are hashed as parsed YAML, so editing a comment leaves every row current; a row measured with other
    settings (or another teacher recipe) is stale. The committed teacher file (``dataset.teacher_file``, with its
    sha256) hashes as the checkpoint it was written from (``dataset.teacher_ckpt``): the same weights, so rows
    measured with either stay current. ``ModelCheckpoint`` callbacks are left out (when weights are saved
    changes nothing measured).
    """

    def by_recipe(node: Any) -> Any:
        if isinstance(node, dict):
            if dataset.teacher_file and node.get("checkpoint") == dataset.teacher_file:
                return {"checkpoint": dataset.teacher_ckpt}
            return {key: by_recipe(value) for key, value in node.items()}
        if isinstance(node, list):  # checkpoint callbacks decide when weights are saved, never what is learned
            return [by_recipe(value) for value in node
                    if not (isinstance(value, dict) and str(value.get("class_path", "")).endswith("ModelCheckpoint"))]
        return node

    def parsed(path: str) -> str:
        return json.dumps(by_recipe(yaml.safe_load((ROOT / path).read_text())), sort_keys=True)

    # every --config counts (a variant overlay on a base); one config hashes exactly as before overlays existed
    config = "".join(parsed(args[i + 1]) for i, arg in enumerate(args) if arg == "--config")
    digest = hashlib.sha256(config.encode())
    digest.update(dataset.data_tag.encode())
    if dataset.teacher_ckpt in config:
        digest.update(parsed(dataset.teacher_config).encode())
    return digest.hexdigest()[:12]


def row_fingerprint(dataset: Dataset, row: str, args: list[str]) -> str:
    """What a CSV record's ``configs_sha`` holds: :func:`configs_sha` of the row's command and, for a row that
    reads a file another command writes (``Row.prepare``: Lopes' activation metadata), of that command's configs
    too, so a changed recording recipe makes its rows stale as a changed config of their own does."""
    fingerprint = configs_sha(dataset, args)
    declared = dataset.declared(row)
    if declared is None or not declared.prepare:
        return fingerprint
    prepared = configs_sha(dataset, declared.prepare[1].split())
    return hashlib.sha256(f"{fingerprint}+{prepared}".encode()).hexdigest()[:12]


def synthesizer_settings(args: list[str]) -> dict:
    """The synthesizer's ``init_args`` of a row: its configs' (overlays merged in order), then command-line
    overrides (as strings); empty for rows on real data."""
    synthesizer: dict = {}
    for i, arg in enumerate(args):
        if arg == "--config":
            config = yaml.safe_load((ROOT / args[i + 1]).read_text()) or {}
            synthesizer.update(((config.get("data") or {}).get("init_args") or {}).get("synthesizer", {}).get("init_args") or {})
    prefix = "--data.init_args.synthesizer.init_args."
    synthesizer.update({arg[len(prefix):]: args[i + 1] for i, arg in enumerate(args) if arg.startswith(prefix)})
    return synthesizer


def synthesis_steps(args: list[str]) -> int | None:
    """Optimizer steps behind each synthesized input of a row: the synthesizer's ``iterations`` (impressions) or
    ``steps_per_round`` (generator rounds); ``None`` when neither is set (rows on real data)."""
    synthesizer = synthesizer_settings(args)
    for key in ("iterations", "steps_per_round"):
        if synthesizer.get(key) is not None:
            return int(synthesizer[key])
    return None


def commands_today(dataset: Dataset, seed: int) -> set[str]:
    """Every command the runner would run for ``seed`` today: each row of ``dataset`` and the ablation, on either
    schedule."""
    rows = [row.name for row in dataset.rows] + ["ablation"]
    return {" ".join(args) for schedule in ("fast", "paper")
            for *_, args in row_commands(dataset, rows, [seed], schedule)}


def is_current(dataset: Dataset, record: dict[str, str]) -> bool:
    """Whether a CSV record was measured with today's configs (see :func:`configs_sha`) by a command the runner
    still prints (a row's own arguments, e.g. its buffer size, are in the command, not in the configs); a record
    naming a config that no longer exists is stale."""
    try:
        if record["command"] not in commands_today(dataset, int(record["seed"])):
            return False
        return record.get("configs_sha", "") == row_fingerprint(dataset, record["row"], record["command"].split())
    except (FileNotFoundError, KeyError, ValueError):
        return False


class RowFailed(Exception):
    """A ``zskd`` command of the table exited non-zero; the message is one line (command, exit code, cause)."""


def printed_test_metrics(stdout: str) -> dict[str, str]:
    """``{"test/acc": "0.975", ...}`` from the test table Lightning prints: plain, or drawn by ``rich`` (its cells
    between box-drawing bars)."""
    return dict(re.findall(r"(test/\w+)[\s\u2502\u2503|]+([0-9.]+)", stdout))


def last_line(text: str) -> str:
    """The last non-blank line of a command's stderr (the CLI's one-line error, or a traceback's exception)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def prepare_row(dataset: Dataset, row: str) -> None:
    """Write the file that ``row`` (or its paper-schedule twin) reads, when it declares one that is missing or was
    written by other settings: the fingerprint of the writing command's configs (:func:`configs_sha`) is kept
    beside the file (``<file>.recipe``), and a file without one, or with another, is written again.

    Raises :class:`RowFailed` when the writing command fails (its own error has gone to the terminal)."""
    declared = dataset.declared(row)
    prepare = declared.prepare if declared else None
    if not prepare:
        return
    target = ROOT / prepare[0]
    stamp = target.with_name(target.name + ".recipe")
    recipe = configs_sha(dataset, prepare[1].split())
    if target.exists() and stamp.exists() and stamp.read_text().strip() == recipe:
        return
    why = "writes" if not target.exists() else "written by other settings: writes again"
    print(f"[{time.strftime('%H:%M:%S')}] zskd {prepare[1]}  ({why} {prepare[0]})", flush=True)
    proc = subprocess.run([sys.executable, "-m", "zskd_lightning", *prepare[1].split(),
                           "--trainer.enable_progress_bar", "false"], cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RowFailed(f"zskd {prepare[1]} exited {proc.returncode}; row {row!r} reads {prepare[0]}, which it writes")
    write_text_atomic(stamp, f"{recipe}\n")


def option_value(args: list[str], option: str) -> str | None:
    """The value given to ``option`` in a row's ``zskd`` arguments (``None`` when absent)."""
    return args[args.index(option) + 1] if option in args else None


def cache_manifest(args: list[str]) -> Path | None:
    """The manifest of a data-free row's impression cache (``None`` for rows without one)."""
    cache_dir = option_value(args, "--data.init_args.cache_dir")
    return None if cache_dir is None else ROOT / cache_dir / "manifest.json"


def row_run_dir(args: list[str]) -> Path | None:
    """The run folder a row's command names (``--trainer.default_root_dir``); ``None`` when it names none (the
    teacher row, which writes where its config says and is not resumed)."""
    run_dir = option_value(args, "--trainer.default_root_dir")
    return None if run_dir is None else ROOT / run_dir


def run_row(args: list[str], resume: Resumption | None = None, online: bool = False) -> dict[str, float]:
    """Run ``zskd ARGS``; return test accuracies (%) and timings read from its output and cache manifest.

    Data-free rows run with ``overwrite_cache`` (not part of the row's command): a cache folder that an
    earlier measurement filled with other settings or another teacher is replaced, one of the same settings is
    resumed (an interrupted row) or reused. The synthesis time of a resumed row is this run's wall time plus
    the manifest's ``resumed_seconds`` (the chunks an earlier run finished; table rows use one process).
    ``resume``: an interrupted run of the row to go on from (its checkpoint is loaded and its work is added
    to the times; :mod:`interrupted_runs`). ``online``: the row synthesizes during distillation; its synthesis
    time is the driver's cumulative figure (checkpoints carry it across resumed runs) and its training time the
    rest of the cumulative wall time; a run that prints no such figure (e.g. one resumed from a checkpoint taken
    after its last step, which trains nothing) raises :class:`RowFailed`.
    The command's stderr is passed on as it comes, with a line for each epoch checkpoint (:mod:`watched`); a
    failed command raises :class:`RowFailed` with its last line.
    """
    manifest = cache_manifest(args)
    overwrite = [] if manifest is None else ["--data.init_args.overwrite_cache", "true"]

    def manifest_text() -> str | None:
        return manifest.read_text() if manifest is not None and manifest.exists() else None

    manifest_before = manifest_text()
    started = time.perf_counter()
    command = [sys.executable, "-m", "zskd_lightning", *args, "--trainer.enable_progress_bar", "false"]
    resumed = [] if resume is None else ["--ckpt_path", str(resume.checkpoint)]
    proc = run_watched(command + overwrite + resumed, cwd=ROOT, run_dir=row_run_dir(args))
    total = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr, flush=True)  # the context of the one line raised below
        raise RowFailed(f"zskd {' '.join(args)} exited {proc.returncode}: {last_line(proc.stderr)}")
    metrics = printed_test_metrics(proc.stdout)
    if "test/acc" not in metrics:
        raise RowFailed(f"zskd {' '.join(args)} printed no 'test/acc VALUE' in its test table (another table style?)")
    # Synthesis time comes from the cache's manifest, also when an earlier run made the cache and this one
    # reused it (a reused cache's manifest is not rewritten).
    manifest_after = manifest_text()
    synthesis = earlier_runs = 0.0
    if manifest_after is not None:
        finished = json.loads(manifest_after)
        synthesis, earlier_runs = finished["wall_seconds"], finished.get("resumed_seconds", 0.0)
    cache_was_ready = manifest_before is not None and manifest_before == manifest_after
    online_figures = ONLINE_LINE.search(proc.stdout + proc.stderr)
    if online and online_figures is None:
        raise RowFailed(f"zskd {' '.join(args)} printed no 'Online synthesis: ...' line, so its synthesis time is "
                        "unknown (resumed from a checkpoint after its last step? delete the row's run folder)")
    if online_figures is not None:  # synthesis ran during distillation (no cache): its rounds' time (cumulative)
        synthesis = float(online_figures.group(2))
    result = {
        "test_acc": 100 * float(metrics["test/acc"]),
        "teacher_acc": 100 * float(metrics.get("test/teacher_acc", metrics["test/acc"])),
        "synthesis_s": synthesis + earlier_runs,
        "total_s": total + (resume.wall_seconds if resume else 0.0),
        "training_s": (total if cache_was_ready else max(total - synthesis, 0.0))
        + (resume.training_seconds if resume else 0.0),
    }
    if online_figures is not None:
        result["synthesized"] = float(online_figures.group(1))
        result["training_s"] = result["total_s"] - result["synthesis_s"]  # both over every run of the row
    return result


#: Between the machines of a row resumed across machines, in its ``hardware`` column (``"A + B"``).
MACHINES_JOINED_BY = " + "


def replace_measurement(records: list[dict[str, str]], new: dict[str, str]) -> list[dict[str, str]]:
    """``records`` with ``new`` appended in place of earlier measurements of its row on the same kind of device
    (:func:`device_kind`: a GPU measurement stands beside the CPU one): the same command, or the same row,
    method, impressions and seed on the same hardware (a machine in common, for rows resumed across machines:
    ``"A + B"``) under a command the runner has since changed (the ablation row holds one method per config at each
    budget: each is a measurement of its own)."""
    key = ("row", "method", "impressions", "seed")

    def machines(record: dict[str, str]) -> set[str]:
        return set(record["hardware"].split(MACHINES_JOINED_BY))

    def replaced(r: dict[str, str]) -> bool:
        same_kind = device_kind(r["hardware"]) == device_kind(new["hardware"])
        same_row = all(r[k] == new[k] for k in key) and bool(machines(r) & machines(new))
        return same_kind and (r["command"] == new["command"] or same_row)

    return [r for r in records if not replaced(r)] + [new]


def timed_with_subnormals(record: dict[str, str]) -> bool:
    """Whether a record distilled from a teacher before :data:`SUBNORMAL_FIX` (it records no commit)."""
    return record["method"] != "ce-real" and not record.get("commit")


@functools.lru_cache(maxsize=None)
def contains_commit(commit: str, ancestor: str) -> bool | None:
    """Whether ``commit`` (a record's, ``+local`` allowed) has ``ancestor`` in its history: ``False`` for no commit,
    ``None`` where git cannot tell (no repository, an unknown commit)."""
    if not commit:
        return False
    if commit == UNKNOWN_COMMIT:
        return None
    try:
        code = subprocess.call(["git", "merge-base", "--is-ancestor", ancestor, commit.removesuffix("+local")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    return {0: True, 1: False}.get(code)


def drawn_in_torch_order(dataset: Dataset, record: dict[str, str]) -> bool:
    """Whether a record trained on a loader shuffled by torch (an offline or real-data row measured before
    :data:`KEYED_ORDER`): its numbers are not what its command draws today (another order of the same data)."""
    declared = dataset.declared(record["row"])
    if declared is not None and declared.kind == "online":
        return False
    return contains_commit(record.get("commit", ""), KEYED_ORDER) is False


def config_setting(args: list[str], *keys: str) -> Any:
    """The value at ``keys`` (e.g. ``"model", "init_args", "sample_weights"``) of a row's configs, the last
    ``--config`` that sets it winning whole (overlays in order; not merged key by key as jsonargparse does, nor
    read from command-line overrides: enough for the table's rows); ``None`` when none sets it."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--config":
            node: Any = yaml.safe_load((ROOT / args[i + 1]).read_text()) or {}
            for key in keys:
                node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
            if node is not KeyError:
                value = node
    return value


def reads_diversity(args: list[str]) -> bool:
    """Whether a row's SSD-KD modulating function has its diversity part on, in synthesis or in distillation."""
    synthesis = str(synthesizer_settings(args).get("diversity", True)).lower() != "false"
    weights = config_setting(args, "model", "init_args", "sample_weights")
    distillation = (isinstance(weights, dict) and str(weights.get("class_path", "")).endswith("ModulatingFunction")
                    and (weights.get("init_args") or {}).get("diversity", True) is not False)
    return synthesis or distillation


def diversity_counted_labels(dataset: Dataset, record: dict[str, str]) -> bool:
    """Whether an SSD-KD record's diversity part counted the buffer's labels, not the teacher's predicted classes
    (measured before :data:`DIVERSITY_FIX` with the part on, labels of sampled classes): its command now weighs
    samples otherwise. A synthesizer with ``classes: teacher`` labels each input by the teacher's argmax, so its
    labels were the predictions all along."""
    declared = dataset.declared(record["row"])
    method = declared.method if declared is not None else record["method"]
    args = record["command"].split()
    if method != "ssd_kd" or not reads_diversity(args) or synthesizer_settings(args).get("classes") == "teacher":
        return False
    return contains_commit(record.get("commit", ""), DIVERSITY_FIX) is False


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def time_to_accuracy(dataset: Dataset, records: list[dict[str, str]]) -> str:
    """One line: the quickest row of ``dataset.target``'s method (synthesis + distillation, from a trained teacher)
    whose MEAN accuracy over its seeds reaches the target, else its row of best mean ("" without a target). Means,
    never the best seed: one lucky seed is not a time to accuracy."""
    if dataset.target is None:
        return ""
    method, target = dataset.target
    label = f"Time to {target}% ({method.upper()}, synthesis + distillation"
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}  # by row, budget (the ablation's) and device kind
    for r in records:
        if r["method"] == method:
            groups.setdefault((r["row"], r["impressions"], device_kind(r["hardware"])), []).append(r)
    if not groups:
        return f"{label}): no {method.upper()} row measured yet."
    rows = [(statistics.fmean(float(r["synthesis_s"]) + float(r["training_s"]) for r in group),
             statistics.fmean(float(r["test_acc"]) for r in group), row, group) for (row, *_), group in groups.items()]

    def said(seconds: float, acc: float, name: str, group: list[dict[str, str]]) -> str:
        return (f"{seconds / 60:.1f} min, row {name}: {acc:.2f}% (mean of {len(group)} seed(s)), "
                f"{group[0]['impressions']} impressions, {group_hardware(group)}")

    reached = [row for row in rows if row[1] >= target]
    if reached:
        return f"{label}, from a trained teacher): {said(*min(reached, key=lambda row: row[0]))}."
    return (f"{label}, from a trained teacher): not reached; the {method.upper()} row of best mean accuracy: "
            f"{said(*max(rows, key=lambda row: row[1]))}.")


def group_command(group: list[dict[str, str]]) -> str:
    """The command of a row; for a row over several seeds, with the seed written ``S`` (one command for all)."""
    command = group[0]["command"]
    if len(group) > 1:
        seed = re.escape(group[0]["seed"])
        command = re.sub(rf"(--seed_everything |--data\.init_args\.seed )({seed})\b", r"\1S", command)
        command = re.sub(rf"_s{seed}\b", "_sS", command)
    return command


def summarize(dataset: Dataset, records: list[dict[str, str]], out_dir: Path | None = None) -> None:
    """Write ``<dataset>.md``, ``<dataset>.png`` and ``<dataset>_time.png`` from the CSV records (into
    ``out_dir``, default :data:`RESULTS`).

    Records measured with other configs than today's (a changed teacher recipe, say) count for nothing: they
    are listed under "Stale rows" with their commands, until re-measured; rows drawn in an order their commands
    no longer draw (:func:`drawn_in_torch_order`), and SSD-KD rows weighed by the buffer's labels
    (:func:`diversity_counted_labels`), are marked.
    """
    out_dir = RESULTS if out_dir is None else out_dir
    current, stale = [], []
    for r in records:  # one fingerprint per record (each parses its configs)
        (current if is_current(dataset, r) else stale).append(r)
    records = current
    teacher = [float(r["test_acc"]) for r in records if r["row"] == "teacher" and r["seed"] == str(dataset.teacher_seed)]
    teacher_acc = teacher[-1] if teacher else None  # the teacher the students were distilled from
    name = dataset.name
    lines = [
        f"# Data-free {dataset.label} table: {dataset.title}",
        "",
        f"Generated by `benchmarks/table.py --dataset {name}` from `{name}.csv`. Test accuracy of the LAST epoch on the official",
        *dataset.notes,
        "Times are wall-clock seconds on the row's hardware.",
        "Rows over several seeds give mean ± standard deviation, mean times, and one command with the seed written S.",
        "Online rows synthesize during distillation into a replay buffer: their impressions are the inputs synthesized"
        " in all, their synthesis time the generator rounds' and their training time the rest.",
        f"Ratios divide by the accuracy each run recorded for the teacher it loaded (seed {dataset.teacher_seed}; Student-CE:"
        " the table's teacher); the teacher's other seeds only"
        f" measure its recipe's spread (command: add `--seed_everything S --trainer.default_root_dir runs/{name}/table/"
        "teacher_sS --trainer.callbacks []`, which keeps the students' checkpoint).",
        "",
        "Impressions are the inputs synthesized; impression-iterations multiply them by the optimizer steps behind each"
        " (a per-input optimization's iterations, or a generator's steps per round).",
        "",
        "| row | impressions | impression-iterations | seeds | test acc. (%) | ratio to teacher | paper (%) | synthesis (s) |"
        " training (s) | hardware | command |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    # one line per row, budget and device kind: seeds of one kind of device pool (CPU models alike), a GPU's not
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = {}
    for r in records:
        groups.setdefault((r["row"], r["method"], r["impressions"], device_kind(r["hardware"])), []).append(r)
    order = dataset.row_order
    def position(row: str) -> int:  # a row no longer declared (renamed) goes last
        return order.index(row) if row in order else len(order)

    any_other_teacher = False
    for (row, method, n, _), group in sorted(groups.items(), key=lambda item: (
            position(item[0][0]), item[0][1], int(item[0][2]), item[0][3] != "CPU", item[0][3])):
        group = sorted(group, key=lambda r: int(r["seed"]))  # seeds in order, whatever order they ran in
        accs = [float(g["test_acc"]) for g in group]
        mean = statistics.mean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        ratio, other_teacher = row_ratio(group, mean, teacher_acc)
        ratio += "§" if other_teacher else ""
        any_other_teacher = any_other_teacher or other_teacher
        declared = dataset.declared(row)
        paper = declared.paper if declared and declared.paper is not None else ""
        label = f"{row} ({method})" if row.startswith("ablation") else row
        iterations = impression_iterations(group[0])
        budget = f"{iterations / 1e6:.1f}M" if iterations else "-"
        slow = "†" if any(timed_with_subnormals(g) for g in group) else ""
        shuffled = "‡" if any(drawn_in_torch_order(dataset, g) for g in group) else ""
        shuffled += "¶" if any(diversity_counted_labels(dataset, g) for g in group) else ""
        lines.append(
            f"| {label} | {n if n != '0' else '-'} | {budget} | {','.join(g['seed'] for g in group)} | {mean:.2f}{spread}{shuffled} | {ratio} | {paper} "
            f"| {statistics.mean(float(g['synthesis_s']) for g in group):.0f}{slow} | {statistics.mean(float(g['training_s']) for g in group):.0f}{slow} "
            f"| {group_hardware(group)} | `zskd {group_command(group)}` |"
        )
    if any(timed_with_subnormals(r) for r in records):
        lines += ["", f"† Measured before commit {SUBNORMAL_FIX}, with the teacher's subnormal weights (left by weight decay): "
                  "each teacher pass ran several times slower on CPU (`python benchmarks/subnormal_weights.py`), so these "
                  "times are upper bounds; the teacher's outputs were the same (bit-identical where tested)."]
    if any_other_teacher:
        lines += ["", f"§ Distilled from a teacher of another accuracy than the table's ({teacher_acc:.2f}%): the ratio "
                  "divides by the accuracy the row's runs recorded for their own teacher."]
    if any(drawn_in_torch_order(dataset, r) for r in records):
        lines += ["", f"‡ Measured before commit {KEYED_ORDER}, on a training order shuffled by torch: its command now "
                  "draws a keyed order (exact on resume), so a re-run gives another draw of the same recipe, not these "
                  "digits."]
    if any(diversity_counted_labels(dataset, r) for r in records):
        lines += ["", f"¶ Measured before commit {DIVERSITY_FIX}: SSD-KD's diversity part counted the replay buffer's "
                  "entries by the class each was made for, not by the teacher's predicted class; its command now "
                  "weighs samples by the latter (the method's definition)."]
    unplaced = sorted({r["row"] for r in records if r.get("commit") and contains_commit(r["commit"], KEYED_ORDER) is None})
    if unplaced:  # a shallow clone, or a record of a copy without git that was given no ZSKD_CODE_COMMIT
        lines += ["", f"Rows whose commit this clone cannot place (unknown, or outside its history): {', '.join(unplaced)}; "
                  "their ‡ and ¶ marks are not checked."]
    lines += ["", dataset.references, "", time_to_accuracy(dataset, records), ""]
    if stale:
        lines += ["## Stale rows", "",
                  "Measured with configs that have since changed (see `configs_sha` in the runner); not counted above. "
                  "Rerun the runner with these rows and seeds to replace them.", "",
                  "| row | impressions | seed | test acc. (%) | command |", "| --- | ---: | --- | ---: | --- |"]
        lines += [f"| {r['row']} | {r['impressions']} | {r['seed']} | {float(r['test_acc']):.2f} "
                  f"| `zskd {r['command']}` |" for r in stale]
        lines.append("")
    write_text_atomic(out_dir / f"{name}.md", "\n".join(lines))
    # The headline rows are the ablation's points at their own budget (the same command is measured once).
    ablation = [r for r in records if r["row"] in ("ablation", *dataset.ablation_rows)]
    has_ablation = any(r["row"] == "ablation" for r in records)
    if has_ablation:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, points in ablation_curves(ablation, lambda r: int(r["impressions"])).items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        if teacher_acc:
            ax.axhline(teacher_acc, color="grey", linestyle="--", label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("impressions")
        ax.set_ylabel("student test accuracy (%)")
        ax.legend()
        fig.tight_layout()
        write_atomic(out_dir / f"{name}.png", lambda handle: fig.savefig(handle, format="png", dpi=120))
        plt.close(fig)
    timed = [r for r in records if r["row"] in dataset.timed_rows]
    if timed:
        curves = ablation_curves(ablation, run_minutes) if has_ablation else {}
        plot_accuracy_against_time(dataset.timed_rows, timed, teacher_acc, out_dir / f"{name}_time.png", curves)
        if not has_ablation:  # no ablation curve: each run at its own budget
            plot_accuracy_against_budget(dataset.timed_rows, timed, teacher_acc, out_dir / f"{name}.png")


def ablation_curves(records: list[dict[str, str]], x_of: Callable[[dict[str, str]], float]
                    ) -> dict[str, list[tuple[float, float]]]:
    """Per method of the budget ablation, ``(mean x_of, mean test accuracy)`` over the runs at each budget, in
    budget order (seeds averaged)."""
    curves = {}
    for method in sorted({r["method"] for r in records}):
        by_count: dict[int, list[dict[str, str]]] = {}
        for r in records:
            if r["method"] == method:
                by_count.setdefault(int(r["impressions"]), []).append(r)
        curves[method] = [(statistics.mean(x_of(r) for r in runs), statistics.mean(float(r["test_acc"]) for r in runs))
                          for _, runs in sorted(by_count.items())]
    return curves


def run_minutes(record: dict[str, str]) -> float:
    """A run's synthesis + distillation wall time, minutes."""
    return (float(record["synthesis_s"]) + float(record["training_s"])) / 60


def row_ratio(group: list[dict[str, str]], mean: float, table_teacher: float | None) -> tuple[str, bool]:
    """A row's ratio student / teacher (4 decimals) and whether its teacher differs from the table's: a row
    trained from a teacher (every method but ``ce-real``) divides by the mean accuracy its runs recorded for
    that teacher (``teacher_acc``), so a record distilled from an older teacher keeps its own ratio; ``ce-real``
    rows (the teacher, Student-CE) divide by the table's teacher."""
    if group[0]["method"] == "ce-real" or not all(g.get("teacher_acc") for g in group):
        return (f"{mean / table_teacher:.4f}" if table_teacher else ""), False
    own = statistics.mean(float(g["teacher_acc"]) for g in group)
    return f"{mean / own:.4f}", table_teacher is not None and abs(own - table_teacher) > 0.005


def impression_iterations(record: dict[str, str]) -> float | None:
    """A run's synthesis budget: inputs synthesized times the optimizer steps behind each (``None`` on real data)."""
    steps = synthesis_steps(record["command"].split())
    return int(record["impressions"]) * steps if steps and record["impressions"] not in ("", "0") else None


def plot_accuracy_against_time(legends: dict[str, str], records: list[dict[str, str]], teacher_acc: float | None,
                               path: Path, curves: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Each run of the rows in ``legends`` (row -> label) as a point: test accuracy against synthesis +
    distillation wall time; ``curves`` (method -> ``(minutes, accuracy)`` at each budget of the ablation): the
    time-to-accuracy curves, drawn as lines."""
    plot_runs(legends, records, teacher_acc, path, run_minutes, "synthesis + distillation (min, wall)", curves=curves)


def plot_accuracy_against_budget(legends: dict[str, str], records: list[dict[str, str]], teacher_acc: float | None,
                                 path: Path) -> None:
    """Each run of the data-free rows in ``legends`` as a point: test accuracy against impression-iterations (log
    scale); for datasets without a budget ablation."""
    plot_runs(legends, [r for r in records if impression_iterations(r)], teacher_acc, path, impression_iterations,
              "impression-iterations (inputs synthesized x steps behind each)", log_x=True)


def plot_runs(legends: dict[str, str], records: list[dict[str, str]], teacher_acc: float | None, path: Path,
              x_of: Callable[[dict[str, str]], float | None], x_label: str, log_x: bool = False,
              curves: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Test accuracy of each run of the rows in ``legends`` (row -> label) against ``x_of(run)``, and each of
    ``curves`` (label -> points) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for index, (method, points) in enumerate((curves or {}).items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], color="grey", linewidth=1, marker=".",
                linestyle=("-", "--", ":", "-.")[index % 4], label=f"{method.upper()}, each budget of the ablation")
    for index, row in enumerate(legends):
        runs = [r for r in records if r["row"] == row]
        if runs:
            marker = "os^D"[index % 4]  # with the 10 default colours: no two of up to 20 rows look alike
            ax.scatter([x_of(r) for r in runs], [float(r["test_acc"]) for r in runs], label=legends[row], marker=marker)
    if teacher_acc:
        ax.axhline(teacher_acc, color="grey", linestyle="--", label="teacher")
    if curves and records:  # the runs' range: a curve's small budgets fall below it, off the axes
        accuracies = [float(r["test_acc"]) for r in records if r["row"] in legends]
        ax.set_ylim(min(accuracies) - 1, max([*accuracies, teacher_acc or 0]) + 0.5)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("student test accuracy (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: no point hidden
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--rows", nargs="+", help="rows to run (default: every default row of the dataset, and the "
                        "ablation where it has one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--schedule", choices=["fast", "paper"], default="fast")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the report and figures from the CSV")
    args = parser.parse_args(argv)
    dataset = DATASETS[args.dataset]
    known = [r.name for r in dataset.rows] + (["ablation"] if dataset.ablation_budgets else [])
    rows = args.rows or [r.name for r in dataset.rows if r.default] + (["ablation"] if dataset.ablation_budgets else [])
    unknown = sorted(set(rows) - set(known))
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: not a row of {dataset.name} (its rows: {', '.join(known)})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{dataset.name}.csv"
    records = read_csv(path)
    if args.summarize:
        summarize(dataset, records)
        return
    # A row is done when measured with the same command AND the same config files (see configs_sha); rows of
    # other configs are kept in the CSV only while their command is not re-measured.
    # ... on the same kind of device: a GPU run measures the rows a CPU run has measured (and keeps them).
    machine = hardware()
    done = {(r["command"], r.get("configs_sha", ""), device_kind(r["hardware"])) for r in records}
    students_teacher = ROOT / (dataset.teacher_file or dataset.teacher_ckpt)
    missing_teacher = (f"{students_teacher} is missing: the committed teacher, written by benchmarks/teachers.py"
                       if dataset.teacher_file
                       else f"train the teacher first (--rows teacher): {students_teacher} is missing")
    for row, method, n, seed, zskd_args in row_commands(dataset, rows, args.seeds, args.schedule):
        command = " ".join(zskd_args)
        fingerprint = row_fingerprint(dataset, row, zskd_args)
        if (command, fingerprint, device_kind(machine)) in done:
            print(f"    {row} seed {seed}: measured with these configs on {device_kind(machine)} (in {path.name})",
                  flush=True)
            continue
        if row != "teacher" and not students_teacher.exists():
            raise SystemExit(missing_teacher)
        try:
            prepare_row(dataset, row)
            run_dir = row_run_dir(zskd_args)
            # taken before the run: a commit made meanwhile in this checkout is not the code that ran
            origin = {"commit": code_commit(), "hardware": machine, "device": device_kind(machine)}
            resume = None if run_dir is None else interrupted_runs.begin(
                run_dir, command, fingerprint, cache_manifest(zskd_args), origin=origin)
            print(f"[{time.strftime('%H:%M:%S')}] zskd {command}", flush=True)
            if resume is not None:
                print(f"    resuming from {resume.checkpoint.relative_to(ROOT)} ({resume.wall_seconds:.0f} s of "
                      f"earlier work)", flush=True)
            declared = dataset.declared(row)
            result = run_row(zskd_args, resume, online=declared is not None and declared.kind == "online")
        except RowFailed as failure:
            raise SystemExit(f"table.py: {failure} (rows measured before it are in {path})") from None
        n = int(result.pop("synthesized", n))
        # a row finished by a later run: every machine it ran on, and the oldest commit (a mark for a fix that an
        # earlier part lacked stays on the row)
        parts = [*(resume.origins if resume is not None else ()), origin]
        record = {"row": row, "method": method, "impressions": n, "seed": seed,
                  "hardware": MACHINES_JOINED_BY.join(dict.fromkeys(str(p.get("hardware")) for p in parts)),
                  "command": command, **{k: f"{v:.4f}" if "acc" in k else f"{v:.1f}" for k, v in result.items()}}
        record["configs_sha"] = fingerprint
        record["commit"] = str(parts[0].get("commit", origin["commit"]))
        done.add((command, fingerprint, device_kind(machine)))
        # the CSV as it is now, not as read at the start: rows deleted (to re-measure) or added meanwhile stay so
        records = replace_measurement(read_csv(path), {k: str(v) for k, v in record.items()})
        write_csv_atomic(path, records, FIELDS)
        summarize(dataset, records)
        if run_dir is not None:
            interrupted_runs.finish(run_dir)
        print(f"    test acc {result['test_acc']:.2f}% in {result['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
