#!/usr/bin/env bash
# Multi-node launch of a fastwan training command inside a SLURM allocation:
# one srun task per node, each running torchrun with GPUS_PER_NODE processes; the ranks
# meet through torchrun's c10d rendezvous on the allocation's first node.
#
# Usage (from an sbatch script, see the *.sbatch files next to this one):
#   scripts/slurm/launch.sh distill recipes/RECIPE.yaml [--section.key=VALUE ...]
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), MASTER_PORT (29500),
#   PYTHON (python).
#
# The recipe's parallel.world_size must equal nodes x GPUs per node; this is checked
# before anything starts (the trainer checks the full layout again before loading models).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 distill|finetune RECIPE.yaml [--section.key=VALUE ...]" >&2
  exit 2
fi
COMMAND=$1
RECIPE=$2
shift 2

: "${SLURM_JOB_ID:?run this inside a SLURM allocation (sbatch / salloc)}"
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
WORLD=$((NNODES * GPUS_PER_NODE))

# The recipe (with the overrides) must ask for exactly this many processes.
WANT=$("$PYTHON" - "$RECIPE" "$@" <<'PY'
import sys

from fastwan.config import load_recipe

overrides = [a for a in sys.argv[2:] if a.startswith("--") and "=" in a]
print(load_recipe(sys.argv[1], overrides).parallel.world_size)
PY
)
if [[ "$WANT" != "$WORLD" ]]; then
  echo "parallel.world_size is $WANT in $RECIPE but the allocation has $NNODES node(s) x" \
       "$GPUS_PER_NODE GPU(s) = $WORLD; change --nodes / --gpus-per-node or the recipe" >&2
  exit 2
fi

echo "fastwan $COMMAND $RECIPE: $NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous" \
     "$MASTER_ADDR:$MASTER_PORT (job $SLURM_JOB_ID)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m fastwan.cli "$COMMAND" "$RECIPE" "$@"
