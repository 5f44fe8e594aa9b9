#!/usr/bin/env bash
# The GPU tests in one command, from the repository root of an installed checkout:
#     bash tests/gpu/run.sh
# 2-rank NCCL + bf16 jobs (1 rank on a 1-GPU node) of fedavg, fedalign (both comm paths) and
# fedamole, a client group of 2 ranks (bf16 and fp32), the small-update check, and a table of round seconds and peak GPU memory per rank.
set -uo pipefail
cd "$(dirname "$0")/../.."
report="$(mktemp)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
FEDALIGN_GPU_REPORT="$report" python -m pytest -q -rs tests/gpu "$@"
code=$?
python - "$report" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("\n| job | ranks | backend | wall s | round s | peak GPU MB per rank | global accuracy |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['job']} | {r['ranks']} | {r['backend']} | {r['wall_s']} | {r['round_s']} | "
          f"{r['peak_gpu_mb_per_rank']} | {r['global_accuracy']:.3f} |")
PY
rm -f "$report"
exit $code
