#!/usr/bin/env bash
# One node, N ranks: bash launch/torchrun_local.sh 2 configs/demo.yaml fed.rounds=3
set -euo pipefail
nproc=${1:-2}; config=${2:-configs/demo.yaml}; shift $(( $# > 2 ? 2 : $# ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" -m fedalign_dist train --config "$config" "$@"
