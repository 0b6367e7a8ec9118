#!/bin/bash
# BatchNorm's textbook claims, one sweep each (issue 18): results/claims/<name>/.
# Every run: B=32, the visible-patch data set (no chance plateau), 4 epochs with a 1-epoch
# warm-up (12 epochs for the convergence sweep). About 12 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p experiments
BIN=target/release/experiments
common=(--norms none,bn,gn:groups=8,ln --batch-sizes 32 --warmup-epochs 1
        --dataset synthetic:train=3000,envelope=1.6,contrast=1)
$BIN sweep "${common[@]}" --seeds 0,1 --epochs 4 \
  --vary base-lr=0.025,0.05,0.1,0.2,0.4,0.8 --out results/claims/learning-rate
$BIN sweep "${common[@]}" --seeds 0,1 --epochs 4 \
  --vary init-gain=0.25,1,4 --out results/claims/initialization
$BIN sweep "${common[@]}" --seeds 0,1,2 --epochs 4 \
  --vary dropout=0,0.3 --out results/claims/dropout
$BIN sweep "${common[@]}" --seeds 0,1 --epochs 4 \
  --vary weight-decay=0,5e-5,5e-4 --out results/claims/weight-decay
$BIN sweep "${common[@]}" --seeds 0,1 --epochs 12 --out results/claims/convergence
