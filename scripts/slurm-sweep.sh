#!/usr/bin/env bash
# Runs a normbench sweep as a SLURM job array: one shard per array task, then merge.
#
#   sbatch --array=1-8 scripts/slurm-sweep.sh            # 8 shards of the default sweep
#   sbatch --array=1-8 scripts/slurm-sweep.sh --epochs 10 --seeds 0,1,2,3,4
#
# Each task writes results/<name>/shard-<i>-of-<n>/ (runs are independent and resumable: resubmit
# a failed task and it skips its finished runs). When all tasks are done:
#
#   target/release/experiments merge --out results/<name> results/<name>/shard-*
#
# Extra arguments are passed to `experiments sweep`. Set NORMBENCH_OUT to choose <name>'s folder
# (default results/slurm).
#SBATCH --job-name=normbench-sweep
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N}"
: "${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=1-N}"
out="${NORMBENCH_OUT:-results/slurm}"
i="$SLURM_ARRAY_TASK_ID"
n="$SLURM_ARRAY_TASK_COUNT"
cargo build --release -p experiments
exec target/release/experiments sweep \
  --shard "$i/$n" \
  --jobs "${SLURM_CPUS_PER_TASK:-1}" \
  --out "$out/shard-$i-of-$n" \
  "$@"
