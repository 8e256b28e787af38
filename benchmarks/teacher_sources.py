"""Which teacher makes a good source of impressions? Teacher recipes judged on the MNIST validation split.

For each recipe and seed: train a LeNet-5 teacher on the MNIST training split (the optimizer and schedule of
configs/mnist/teacher_lenet5.yaml without augmentation, plus one change), then distil a LeNet-5-half student
from a few thousand ZSKD impressions of it (the synthesizer of configs/mnist/zskd_lenet5_half_fast.yaml,
optionally with ``jitter``) and report both accuracies on the VALIDATION split (the test set is never read).
The seed varies the teacher only: every student's impressions and initialization use seed 0, so a recipe's
spread over seeds is its teachers' spread.
Adds its rows to benchmarks/results/teacher_sources.csv (replacing earlier ones of the same recipe, seed, jitter,
impressions and epochs) and rewrites teacher_sources.md beside it.

    ZSKD_DATA_ROOT=../shared/data python benchmarks/teacher_sources.py --recipes no_augmentation shifts \
        --jitter 0 2
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
import yaml
from torch import nn

from table import code_commit
from zskd_lightning import ClassifierModule, FrozenTeacher, GeneratorSynthesizer, Synthesizer, ZSKDSynthesizer
from zskd_lightning.augment import BatchAugmentation
from zskd_lightning.data import MNISTDataModule
from zskd_lightning.files import write_csv_atomic, write_text_atomic
from zskd_lightning.models import LeNet5
from zskd_lightning.synthesis import Regularizer
from zskd_lightning.teacher import instantiate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAST_CONFIG = ROOT / "configs" / "mnist" / "zskd_lenet5_half_fast.yaml"
FIELDS = ["recipe", "seed", "jitter", "impressions", "teacher_epochs", "student_epochs", "teacher_val", "student_val",
          "teacher_s", "student_s", "cache", "commit"]
#: A row's identity: recipe, seed and every budget, so a run at other epochs adds rows instead of replacing.
KEY = ("recipe", "seed", "jitter", "impressions", "teacher_epochs", "student_epochs")
#: The epochs rows written before these columns existed were made at (the flags' defaults then, e789429).
EARLIER_DEFAULTS = {"teacher_epochs": "60", "student_epochs": "300", "cache": "", "commit": ""}

#: The one change each recipe makes to the unaugmented teacher recipe (Adam, lr 2e-3, weight decay 5e-4,
#: batch 64, cosine schedule; the shipped config's recipe): (augmentation of the training
#: batches, dropout after the hidden FC layers, EMA decay of the weights).
RECIPES: dict[str, tuple[BatchAugmentation | None, float, float]] = {
    "no_augmentation": (None, 0.0, 0.0),
    "ema": (None, 0.0, 0.9995),
    "dropout": (None, 0.2, 0.0),
    "noise": (BatchAugmentation(noise_std=0.3), 0.0, 0.0),
    "shifts": (BatchAugmentation(translate=(2 / 32, 2 / 32)), 0.0, 0.0),
    "light_augmentation": (BatchAugmentation(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05)), 0.0, 0.0),
}


def mnist(augment: BatchAugmentation | None = None, batch_size: int = 64) -> MNISTDataModule:
    """The teacher config's data: MNIST padded to 32x32, 10% validation split with seed 0."""
    return MNISTDataModule(batch_size=batch_size, val_fraction=0.1, seed=0, augment=augment or False, download=False)


def _trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def loader_accuracy(network: nn.Module, loader) -> float:
    """Accuracy (%) of ``network`` (put in eval mode) on the ``(x, y)`` batches of ``loader``."""
    network.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((network(x).argmax(1) == y).sum())
            total += len(y)
    return 100 * correct / total


def validation_accuracy(network: nn.Module) -> float:
    """Accuracy (%) of ``network`` on the MNIST validation split."""
    data = mnist(batch_size=512)
    data.setup("fit")
    return loader_accuracy(network, data.val_dataloader())


def train_teacher(recipe: str, seed: int, epochs: int, path: Path) -> float:
    """Train the recipe's teacher, save its checkpoint to ``path``; return its validation accuracy (%)."""
    augment, dropout, ema = RECIPES[recipe]
    L.seed_everything(seed)
    network = LeNet5(1, 10)
    if dropout:  # after each hidden ReLU; the parameter names stay those of LeNet5
        for i, layer in enumerate(network.classifier):
            if isinstance(layer, nn.ReLU):
                network.classifier[i] = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
    model = ClassifierModule(network, optimizer=partial(torch.optim.Adam, lr=2e-3, weight_decay=5e-4),
                             lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    callbacks = [L.pytorch.callbacks.EMAWeightAveraging(decay=ema)] if ema else []
    trainer = _trainer(epochs, callbacks=callbacks)
    trainer.fit(model, mnist(augment))
    trainer.save_checkpoint(path)
    return validation_accuracy(FrozenTeacher(network=LeNet5(1, 10), checkpoint=str(path)))


def cache_use(cache_dir: Path) -> str:
    """``"reused"`` if ``cache_dir`` holds a finished impression cache (a run's time is then distillation only),
    else ``"made"`` (chunks a crashed run left count as made: the run finishes them)."""
    return "reused" if (cache_dir / "manifest.json").exists() else "made"


def teacher_tag(checkpoint: Path) -> str:
    """The first 12 hex digits of a LeNet-5 checkpoint's teacher fingerprint: impressions are kept per teacher, so
    a retrained teacher that differs in any bit gets caches of its own instead of a refused cache."""
    return FrozenTeacher(network=LeNet5(1, 10), checkpoint=str(checkpoint)).fingerprint()[:12]


def config_synthesizer(config: Path, **overrides) -> Synthesizer | GeneratorSynthesizer:
    """The synthesizer (impression or online) of a shipped config, with ``overrides`` of its arguments."""
    spec = yaml.safe_load(config.read_text())["data"]["init_args"]["synthesizer"]
    return instantiate({"class_path": spec["class_path"], "init_args": {**spec["init_args"], **overrides}},
                       bases=(Synthesizer, GeneratorSynthesizer, Regularizer), modules=("zskd_lightning",),
                       source=str(config))


def fast_synthesizer(jitter: int) -> ZSKDSynthesizer:
    """The ZSKD synthesizer of the fast MNIST config, with ``jitter``."""
    return config_synthesizer(FAST_CONFIG, jitter=jitter)


def config_teacher(config: Path, checkpoint: Path | None = None) -> FrozenTeacher:
    """The frozen teacher of a shipped config (its checkpoint path read relative to the repository), or, with
    ``checkpoint``, that checkpoint's weights in the config teacher's architecture."""
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]["teacher"]
    args = dict(spec.get("init_args") or {})
    if args.get("checkpoint") and not Path(args["checkpoint"]).is_absolute():
        args["checkpoint"] = str(ROOT / args["checkpoint"])
    teacher = instantiate({"class_path": spec["class_path"], "init_args": args}, modules=("zskd_lightning",),
                          source=str(config))
    return teacher if checkpoint is None else FrozenTeacher(network=teacher.network, checkpoint=str(checkpoint))


def distil_config_student(config: Path, impressions: int, epochs: int | None, cache_dir: Path,
                          synthesizer: Synthesizer | GeneratorSynthesizer | None = None, seed: int = 0,
                          batch_augmentation: BatchAugmentation | None = None, teacher: Path | None = None,
                          data_changes: dict | None = None, model_changes: dict | None = None,
                          ema_decay: float | None = None) -> float:
    """The student of a shipped ``config`` distilled from its teacher (``teacher`` swaps in another checkpoint of
    that architecture); validation accuracy (%) on the config's ``eval_data``.

    Everything comes from the config (its datamodule, an impression or an online one, with its synthesizer unless
    ``synthesizer`` is given; the distillation module with its student, temperature and per-sample weights; the
    optimizer; ``max_epochs`` unless ``epochs``) except: ``impressions`` impressions cached in ``cache_dir`` and no
    held-out ones (impression configs; an online config keeps its own budget), ``seed`` for the synthesis and the
    student, batches augmented by ``batch_augmentation`` (default blends of pairs, ``mix=0.5``, not the config's
    own), ``data_changes`` (other arguments of the datamodule, e.g. an online buffer's size), ``model_changes``
    (other arguments of the distillation module, e.g. its ``temperature``; its ``optimizer`` entry updates the
    optimizer's arguments, e.g. ``{"lr": 0.003}``), a cosine schedule over the epochs, no export, and with an
    ``ema_decay`` the exponential moving average of the student's weights (per optimizer step) in the end. Pictures
    (impressions or the buffer) go to the folder ``<cache_dir>_run``."""
    spec = yaml.safe_load(config.read_text())
    model, data = spec["model"]["init_args"], spec["data"]["init_args"]
    epochs = int(epochs if epochs is not None else spec["trainer"]["max_epochs"])
    build = partial(instantiate, bases=(object,), modules=("zskd_lightning",), source=str(config))
    L.seed_everything(seed)
    synthesizer = synthesizer if synthesizer is not None else config_synthesizer(config)
    eval_spec = data["eval_data"]
    eval_data = build({"class_path": eval_spec["class_path"],
                       "init_args": {**(eval_spec.get("init_args") or {}), "download": False, "batch_size": 512}})
    data_settings = {**data, "synthesizer": synthesizer, "eval_data": eval_data, "seed": seed,
                     "batch_augmentation": batch_augmentation or BatchAugmentation(mix=0.5)}
    if "num_impressions" in data:
        data_settings.update(num_impressions=impressions, cache_dir=str(cache_dir), num_val_impressions=0)
    data_settings.update(data_changes or {})
    datamodule = build({"class_path": spec["data"]["class_path"], "init_args": data_settings})
    model_changes = dict(model_changes or {})
    optimizer = model["optimizer"]
    optimizer_settings = {**(optimizer.get("init_args") or {}), **model_changes.pop("optimizer", {})}
    if not optimizer["class_path"].startswith("torch.optim."):
        raise SystemExit(f"{config}: the trials build torch.optim optimizers, got {optimizer['class_path']}")
    optimizer_class = getattr(torch.optim, optimizer["class_path"].rpartition(".")[2])
    frozen, student = config_teacher(config, teacher), build(model["student"])  # in this order: seeded init
    kept = {key: value for key, value in model.items()
            if key not in ("teacher", "student", "optimizer", "lr_scheduler")}
    kept.update(model_changes)
    distillation = build({"class_path": spec["model"]["class_path"], "init_args": {
        **kept, "teacher": frozen, "student": student, "export_filename": None,
        "optimizer": partial(optimizer_class, **optimizer_settings),
        "lr_scheduler": partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)}})
    picture_folder = cache_dir.with_name(cache_dir.name + "_run")
    callbacks = [L.pytorch.callbacks.EMAWeightAveraging(decay=ema_decay)] if ema_decay is not None else []
    _trainer(epochs, limit_val_batches=0, default_root_dir=str(picture_folder),
             callbacks=callbacks).fit(distillation, datamodule)
    eval_data.setup("fit")
    return loader_accuracy(distillation.student, eval_data.val_dataloader())


def distil_student(checkpoint: Path, impressions: int, jitter: int, epochs: int, cache_dir: Path,
                   synthesizer: Synthesizer | None = None, seed: int = 0,
                   batch_augmentation: BatchAugmentation | None = None) -> float:
    """:func:`distil_config_student` of the fast MNIST config with the MNIST LeNet-5 ``checkpoint`` as teacher and
    ``synthesizer``, default the fast config's ZSKD with ``jitter``; validation accuracy (%)."""
    return distil_config_student(FAST_CONFIG, impressions, epochs, cache_dir,
                                 synthesizer if synthesizer is not None else fast_synthesizer(jitter), seed,
                                 batch_augmentation, teacher=checkpoint)


def summarize(records: list[dict[str, str]], path: Path) -> None:
    """Write the markdown table ``path``: mean (and per-seed values) per recipe and jitter."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for r in records:
        groups.setdefault((r["recipe"], r["jitter"], r["impressions"], r["teacher_epochs"], r["student_epochs"]),
                          []).append(r)
    lines = ["# Teacher recipes as impression sources (MNIST validation split)", "",
             "Generated by `benchmarks/teacher_sources.py`. LeNet-5 teachers (the unaugmented recipe plus one",
             "change), LeNet-5-half students distilled from ZSKD impressions of each (the fast config's synthesizer",
             "at the row's jitter; distilled on blends of impression pairs, no geometric augmentation); accuracies",
             "on the validation split, mean over seeds (each seed in brackets). A row's command:",
             "`ZSKD_DATA_ROOT=../shared/data python benchmarks/teacher_sources.py --recipes RECIPE --seeds S --jitter J",
             "--impressions N --teacher-epochs E --student-epochs F`.", "",
             "| recipe | jitter | impressions | teacher epochs | student epochs | seeds | teacher val (%) "
             "| student val (%) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for (recipe, *budget), group in sorted(groups.items(), key=lambda item: (list(RECIPES).index(item[0][0]),
                                                                             *map(int, item[0][1:]))):
        def cell(key: str) -> str:
            values = [float(g[key]) for g in group]
            each = f" ({' / '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
            return f"{statistics.mean(values):.2f}{each}"
        seeds = ",".join(g["seed"] for g in group)
        lines.append(f"| {recipe} | {' | '.join(budget)} | {seeds} | {cell('teacher_val')} | {cell('student_val')} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jitter", nargs="+", type=int, default=[0], help="synthesis jitter values to try")
    parser.add_argument("--impressions", type=int, default=2000)
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=300)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "teacher_sources")
    parser.add_argument("--results", type=Path, default=RESULTS / "teacher_sources.csv")
    args = parser.parse_args(argv)
    records = [{**EARLIER_DEFAULTS, **r} for r in csv.DictReader(args.results.open())] if args.results.exists() else []
    for recipe in args.recipes:
        for seed in args.seeds:
            folder = args.work_dir / f"{recipe}_t{args.teacher_epochs}_s{seed}"  # its impression caches inside
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            teacher_val = train_teacher(recipe, seed, args.teacher_epochs, folder / "teacher.ckpt")
            teacher_s = time.perf_counter() - started
            tag = teacher_tag(folder / "teacher.ckpt")
            for jitter in args.jitter:
                started = time.perf_counter()
                cache_dir = folder / f"impressions_j{jitter}_{args.impressions}_{tag}"
                cache = cache_use(cache_dir)
                student_val = distil_student(folder / "teacher.ckpt", args.impressions, jitter, args.student_epochs,
                                             cache_dir)
                record = {"recipe": recipe, "seed": str(seed), "jitter": str(jitter), "impressions": str(args.impressions),
                          "teacher_epochs": str(args.teacher_epochs), "student_epochs": str(args.student_epochs),
                          "teacher_val": f"{teacher_val:.2f}", "student_val": f"{student_val:.2f}",
                          "teacher_s": f"{teacher_s:.0f}", "student_s": f"{time.perf_counter() - started:.0f}",
                          "cache": cache, "commit": code_commit()}
                records = [r for r in records if any(r[k] != record[k] for k in KEY)] + [record]
                args.results.parent.mkdir(parents=True, exist_ok=True)
                write_csv_atomic(args.results, records, FIELDS)
                summarize(records, args.results.with_suffix(".md"))
                print(f"{recipe} seed {seed} jitter {jitter}: teacher {teacher_val:.2f}% student {student_val:.2f}% "
                      "(validation split)", flush=True)


if __name__ == "__main__":
    main()
