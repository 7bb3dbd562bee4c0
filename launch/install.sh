#!/usr/bin/env bash
# Installs mcnn-jax and everything it needs into the active Python environment (a virtualenv is best):
#   1. an MPI from PyPI (the mpich wheel, which brings mpicc and mpiexec) and mpi4py,
#   2. the package itself, which builds mpi4jax from source against that MPI.
# Usage: launch/install.sh [--dev] [--system-mpi]
#   --dev         also the test tools (pytest)
#   --system-mpi  use the MPI already on PATH (a cluster's module) instead of the mpich wheel
# Set PYTHON to choose the interpreter (default: python3 of the active environment).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
extras=""
system_mpi=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --system-mpi) system_mpi=1 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --system-mpi)" >&2; exit 2 ;;
  esac
done
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "install.sh: mcnn-jax needs Python >= 3.11; $("$py" --version 2>&1) found" >&2; exit 1; }
# The environment's own bin folder first, so the mpicc of the mpich wheel is found at build time.
prefix_bin=$("$py" -c 'import sys, os; print(os.path.join(sys.prefix, "bin"))')
export PATH="$prefix_bin:$PATH"
pip=("$py" -m pip --disable-pip-version-check)

if [ "$system_mpi" = 1 ]; then
  command -v mpicc >/dev/null || { echo "install.sh: --system-mpi needs mpicc on PATH (load your MPI module)" >&2; exit 1; }
  echo ">> building mpi4py against $(command -v mpicc)"
  "${pip[@]}" install --no-binary mpi4py --no-cache-dir "mpi4py>=4.1,<5"
  no_mpich=1
else
  echo ">> installing MPI from PyPI (mpich wheel) and mpi4py"
  "${pip[@]}" install "mpich>=5.0,<6" "mpi4py>=4.1,<5"
  no_mpich=0
fi

# mpi4jax builds its CUDA bridge whenever it finds nvcc; point it at the toolkit's headers, which it needs
# then (a machine without nvcc needs nothing).
if [ -z "${CUDA_ROOT:-}" ] && command -v nvcc >/dev/null; then
  for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(command -v nvcc)")")" /usr/local/cuda /opt/cuda; do
    if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ]; then export CUDA_ROOT="$cand"; break; fi
  done
  if [ -z "${CUDA_ROOT:-}" ]; then
    echo "install.sh: nvcc is on PATH but no CUDA toolkit headers (include/cuda_runtime.h) were found;" >&2
    echo "            set CUDA_ROOT to the toolkit's root folder, or take nvcc off PATH, and rerun." >&2
    exit 1
  fi
  echo ">> nvcc found: building mpi4jax with CUDA_ROOT=$CUDA_ROOT"
fi

echo ">> installing mcnn-jax$extras (builds mpi4jax against $(command -v mpicc))"
if [ "$no_mpich" = 1 ]; then
  # everything but the mpich wheel, then the package without dependency resolution
  "$py" - "$here/pyproject.toml" "$extras" <<'PY' > "${TMPDIR:-/tmp}/mcnn-jax-reqs.txt"
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = [d for d in p["dependencies"] if not d.startswith("mpich")]
if sys.argv[2]:
    deps += p["optional-dependencies"]["dev"]
print("\n".join(deps))
PY
  "${pip[@]}" install -r "${TMPDIR:-/tmp}/mcnn-jax-reqs.txt"
  "${pip[@]}" install --no-deps -e "$here"
else
  "${pip[@]}" install -e "$here$extras"
fi
"$py" -c 'import mpi4jax, mcnn_jax; print(">> mcnn-jax", mcnn_jax.__version__, "with mpi4jax", mpi4jax.__version__, "is installed")'
# The native convolution kernels (mcnn_jax/model/native/conv.cc) are compiled for this CPU on first use; build them
# now so that a missing compiler shows here, not as a slower first run (which falls back to XLA, with a warning).
"$py" - <<'PY'
from mcnn_jax.model import native
s = native.status()
if s["ok"]:
    print(f">> native CPU kernels built: {s['vector_width']}-float vectors, {s['threads']} threads ({s['path']})")
else:
    print(f">> WARNING: native CPU kernels unavailable ({s['reason']}); training uses the slower XLA form")
PY
