#!/bin/bash
# CIFAR-10 data-free table rows on a lent GPU machine (the workplace's `device` tool), reading the test split only.
#
# Prepare once, here, in the repository root (both folders are git-ignored; about 31 MB together):
#   mkdir -p data/cifar-10-batches-py && cp ../shared/data/cifar-10-batches-py/test_batch data/cifar-10-batches-py/
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
# (the machine's image has torch, torchvision, lightning, torchmetrics and safetensors, not jsonargparse).
# Then run, carrying `data` and `.whl`, with the commit the copy holds (it has no .git; here: `git rev-parse
# --short=7 HEAD`, plus `+local` if the library or configs have changes):
#   ZSKD_CODE_COMMIT=COMMIT bash benchmarks/device_cifar10.sh ROW... [-- TABLE OPTIONS]
#   e.g. `ZSKD_CODE_COMMIT=1234abc bash benchmarks/device_cifar10.sh zskd wang -- --seeds 0 --schedule paper`
# The rows' impression caches stay under runs/ between calls on one warm machine (the runner resumes them); the
# table's CSV and report, and the log, come back through $OUT. Merge the CSV's new rows into the committed one.
set -o pipefail
rows=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do rows+=("$1"); shift; done
[ "$1" = "--" ] && shift
[ ${#rows[@]} -gt 0 ] || { echo "usage: $0 ROW... [-- TABLE OPTIONS]" >&2; exit 2; }
[ -n "$ZSKD_CODE_COMMIT" ] || { echo "set ZSKD_CODE_COMMIT to the commit this copy holds: the table records it" >&2; exit 2; }
[ -f data/cifar-10-batches-py/test_batch ] || { echo "data/cifar-10-batches-py/test_batch missing: carry data" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the wheels in .whl: carry .whl" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 ZSKD_DATA_ROOT="$PWD/data"
out="${OUT:-runs/device}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
python3 benchmarks/table.py --dataset cifar10 --rows "${rows[@]}" "$@" 2>&1 | tee "$out/table.log"
status=$?
cp benchmarks/results/cifar10.csv benchmarks/results/cifar10.md "$out/" 2>/dev/null
exit $status
