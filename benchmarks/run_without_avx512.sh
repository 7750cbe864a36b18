#!/usr/bin/env bash
# run_vs_torchebm089.sh as it runs on an x86-64 CPU without AVX-512, on a machine that has AVX-512 (issue 13 asks
# for both; the development VMs of this project have been both kinds). Every compiled extension, ours and the
# harness's hand-written C++ chain alike, is built for $MARCH (default znver3: AMD Zen 3, AVX2 + FMA, no AVX-512)
# instead of -march=native, through a compiler wrapper given as CXX; torch's own kernels run their AVX2 build
# (ATEN_CPU_CAPABILITY=avx2) and MKL its AVX2 code (MKL_ENABLE_INSTRUCTIONS=AVX2). The builds go to a fresh
# extension folder (torch's cache does not key on the compiler) and are checked for AVX-512 registers before the run.
# Usage: bash benchmarks/run_without_avx512.sh [run_vs_torchebm089.sh args, e.g. --workloads W1,W1s --limits]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH_DIR:-$ROOT/../shared/bench}"
NEW_PY="${NEW_PY:-$ROOT/.venv/bin/python}"
MARCH="${MARCH:-znver3}"
REAL_CXX="$(command -v "${CXX:-c++}")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/c++" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do case "\$a" in -march=native) args+=(-march=$MARCH) ;; *) args+=("\$a") ;; esac; done
exec "$REAL_CXX" "\${args[@]}"
EOF
chmod +x "$WORK/c++"
export CXX="$WORK/c++" TORCH_EXTENSIONS_DIR="$WORK/ext" ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
unset TORCHEBM_EXTENSIONS_DIR

# build both extensions now (not inside a timed worker), then make sure neither uses an AVX-512 register
(cd "$BENCH" && "$NEW_PY" -c "import limits; limits.load_ext()")
(cd /tmp && "$NEW_PY" -c "
import torch, torchebm.cuda
from torchebm.core import DoubleWellModel
from torchebm.samplers import LangevinDynamics
LangevinDynamics(DoubleWellModel(), step_size=0.01).sample(x=torch.zeros(4, 2), n_steps=2)
assert torchebm.cuda.extension_state('cpu_samplers').module is not None, torchebm.cuda.status()
print('torch CPU capability:', torch.backends.cpu.get_cpu_capability())")
for so in $(find "$WORK/ext" -name '*.so'); do
  zmm=$(objdump -d "$so" | grep -c zmm || true)
  echo "$(basename "$so"): $zmm instructions on AVX-512 registers"
  [ "$zmm" = 0 ] || { echo "the $MARCH build uses AVX-512" >&2; exit 1; }
done
bash "$ROOT/benchmarks/run_vs_torchebm089.sh" "$@"
