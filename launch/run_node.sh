#!/usr/bin/env bash
# Runs N data-parallel ranks on one node, each bound to its own share of the cores, with its thread pools
# (XLA's intra-op threads, OpenMP, BLAS) sized to that share. The published CPU recipe ran one rank per socket
# rather than one large process; on a 2-socket node try -n 2, on this 2-core machine -n 2 gives 1 core a rank.
#
#   launch/run_node.sh -n 2 mcnn-train --config configs/default.py --workdir runs/default
#   launch/run_node.sh -n 4 --cores 32 mcnn-train --config configs/bbbc021.py --workdir runs/bbbc021
#
# Options: -n RANKS (default: 1 per socket), --cores C (cores to use, default: all this process may use),
#          --dry-run (print the mpiexec command). Set MPIEXEC to use another launcher.
set -euo pipefail
ranks=""; cores=""; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--ranks) ranks=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "run_node.sh: give the command to run, e.g. mcnn-train --config ... --workdir ..." >&2; exit 2; }
[ -n "$cores" ] || cores=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || nproc)
if [ -z "$ranks" ]; then
  ranks=$(lscpu 2>/dev/null | awk -F: '/^Socket\(s\)/ {gsub(/ /, "", $2); print $2}')
  [ -n "$ranks" ] || ranks=1
fi
if [ "$ranks" -lt 1 ] || [ "$cores" -lt "$ranks" ]; then
  echo "run_node.sh: need 1 <= ranks <= cores (got $ranks ranks, $cores cores)" >&2; exit 2
fi
threads=$((cores / ranks))
mpiexec=${MPIEXEC:-mpiexec}
command -v "$mpiexec" >/dev/null || { echo "run_node.sh: $mpiexec not found; run launch/install.sh or load your MPI module" >&2; exit 2; }
envs=(OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads"
)
if "$mpiexec" --version 2>&1 | grep -qi "open mpi"; then
  cmd=("$mpiexec" -n "$ranks" --map-by "slot:PE=$threads" --bind-to core)
  for e in "${envs[@]}"; do cmd+=(-x "$e"); done
else  # MPICH / Intel MPI (Hydra)
  cmd=("$mpiexec" -n "$ranks" -bind-to "core:$threads")
  for e in "${envs[@]}"; do cmd+=(-env "${e%%=*}" "${e#*=}"); done
fi
cmd+=("$@")
echo ">> $ranks rank(s) x $threads core(s): ${cmd[*]}" >&2
[ "$dry" = 1 ] && exit 0
exec "${cmd[@]}"
