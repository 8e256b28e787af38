"""Write a trained benchmark teacher into the repository: its weights in safetensors (no pickle) and a JSON record
beside them (architecture, recipe, accuracy, training time, hardware, sha256), so that a table row or a user's
first try needs no retraining.

    python benchmarks/teachers.py --checkpoint runs/mnist/teacher_lenet5/last.ckpt --name mnist_lenet5 \\
        --config configs/mnist/teacher_lenet5.yaml --table benchmarks/results/mnist.csv

writes ``benchmarks/teachers/mnist_lenet5.safetensors`` and ``mnist_lenet5.json``. Accuracy, training time and
hardware come from the table's ``teacher`` row of the config's seed (the run that wrote the checkpoint). Load it
with ``FrozenTeacher(checkpoint="benchmarks/teachers/mnist_lenet5.safetensors", sha256=<the record's sha256>)``:
the digest check refuses a changed file in one line.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from safetensors.torch import save
from table import DATASETS, configs_sha

from zskd_lightning._version import __version__
from zskd_lightning.files import file_sha256, record_path, write_atomic, write_text_atomic
from zskd_lightning.records import TEACHER_FORMAT, VERSIONS
from zskd_lightning.teacher import FrozenTeacher, network_spec, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ROOT / "benchmarks" / "teachers"


def table_row(table: Path, command: str) -> dict[str, str]:
    """The table's latest teacher row whose command is ``command``, measured with today's configs when the table is
    one of the runner's (``DATASETS``, by file stem: its ``configs_sha`` must match); one-line error otherwise."""
    with open(table, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["row"] == "teacher" and row["command"] == command]
    if not rows:
        raise SystemExit(f"{table}: no teacher row with command {command!r}; run the table's teacher row first")
    dataset = DATASETS.get(table.stem)
    if dataset is not None:
        today = configs_sha(dataset, command.split())
        current = [row for row in rows if row.get("configs_sha") == today]
        if not current:
            raise SystemExit(f"{table}: the teacher row {command!r} was measured with other configs (configs_sha "
                             f"{rows[-1].get('configs_sha') or 'none'}, today's {today}); run the table's teacher "
                             "row again")
        rows = current
    return rows[-1]


def write_teacher(checkpoint: str, name: str, config: str, table: Path, out_dir: Path = TEACHERS) -> Path:
    """Write ``out_dir/name.safetensors`` and its record from a ``ClassifierModule`` checkpoint; returns the record."""
    content = read_checkpoint(checkpoint)
    spec = network_spec(content)
    if spec is None:
        raise SystemExit(f"{checkpoint} records no architecture (hyper_parameters['network'])")
    teacher = FrozenTeacher(checkpoint=checkpoint)
    measured = table_row(table, f"fit --config {config}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in teacher.network.state_dict().items()}
    write_atomic(weights, lambda handle: handle.write(save(state)))
    record = {
        "format": TEACHER_FORMAT,
        "version": VERSIONS[TEACHER_FORMAT],
        "class_path": spec["class_path"],
        "init_args": spec["init_args"],
        "sha256": file_sha256(weights),
        "fingerprint": teacher.fingerprint(),
        "recipe": f"zskd fit --config {config}",
        "test_accuracy": float(measured["test_acc"]),
        "training_s": float(measured["training_s"] or measured["total_s"]),
        "hardware": measured["hardware"],
        "library_version": __version__,
    }
    path = Path(record_path(weights))
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(f"{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}: {weights.stat().st_size} bytes, "
          f"sha256 {record['sha256']}, test accuracy {record['test_accuracy']:.2f}%")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the trained teacher's Lightning checkpoint")
    parser.add_argument("--name", required=True, help="file stem under benchmarks/teachers/")
    parser.add_argument("--config", required=True, help="the config that trained it (its recipe)")
    parser.add_argument("--table", type=Path, required=True, help="the table CSV holding the teacher row")
    args = parser.parse_args(argv)
    write_teacher(args.checkpoint, args.name, args.config, args.table)


if __name__ == "__main__":
    main()
