#!/usr/bin/env bash
# Side-by-side benchmark of this checkout's torchebm against TorchEBM 0.8.9 with the shared harness
# (../shared/bench, see its README): both libraries in their own venvs, interleaved rounds, ratio tables.
# Usage: bash benchmarks/run_vs_torchebm089.sh [extra bench.py args, e.g. --workloads W1,W2 --quick]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH_DIR:-$ROOT/../shared/bench}"
NEW_PY="${NEW_PY:-$ROOT/.venv/bin/python}"
OLD_VENV="${OLD_VENV:-$ROOT/.venv089}"
OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT"
if [ ! -x "$OLD_VENV/bin/python" ]; then
  python3 -m venv "$OLD_VENV"
  "$OLD_VENV/bin/pip" install -q torch==2.13.0
  "$OLD_VENV/bin/pip" install -q torchebm==0.8.9
fi
cd "$BENCH"   # never run from the repo root: the local torchebm/ would shadow 0.8.9
python3 bench.py pair --a "$OLD_VENV/bin/python" --b "$NEW_PY" --a-label torchebm089 --b-label torchebm \
  --out "$OUT/pair_torchebm_vs_089.json" "$@"
python3 compare.py "$OUT/pair_torchebm_vs_089.json" | tee "$OUT/pair_torchebm_vs_089.md"
