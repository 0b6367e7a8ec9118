#!/usr/bin/env bash
# Reruns a slice of the reference sweep and checks that its rows come out bit for bit as
# committed in results/reference (runs.csv and epochs.csv, wall time aside).
# Usage: scripts/check-reference.sh [BATCH_SIZE] [SEED]   (defaults: 4 0; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
b=${1:-4}
seed=${2:-0}
ref=results/reference
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --release -q -p experiments
norms=$(python3 -c "import json;print(','.join(json.load(open('$ref/manifest.json'))['norms']))" 2>/dev/null \
  || echo "bn,gn:groups=8,ln,in")
target/release/experiments sweep --norms "$norms" --batch-sizes "$b" --seeds "$seed" \
  --out "$out/slice" 2>/dev/null
# A run's numbers: every column but wall_seconds (runs.csv's 11th); its epochs whole.
pick_runs() { awk -F, -v b="$b" -v s="$seed" 'NR > 1 && $2 == b && $3 == s' "$1" | cut -d, -f1-10,12 | sort; }
pick_epochs() { awk -F, -v b="$b" -v s="$seed" 'NR > 1 && $2 == b && $3 == s' "$1" | sort; }
status=0
for what in runs epochs; do
  want=$(pick_$what "$ref/$what.csv")
  got=$(pick_$what "$out/slice/$what.csv")
  if [ -z "$want" ]; then
    echo "check-reference: $ref/$what.csv has no rows for B=$b seed=$seed" >&2
    status=1
  elif [ "$want" != "$got" ]; then
    echo "check-reference: $what.csv differs for B=$b seed=$seed:" >&2
    diff <(echo "$want") <(echo "$got") >&2 || true
    status=1
  else
    echo "check-reference: $what.csv, B=$b seed=$seed: $(echo "$want" | wc -l) rows identical"
  fi
done
exit $status
