#!/usr/bin/env bash
# Start pretrain_moe.py under torchrun on this node; single node or one node of a multi-node job.
#
#   scripts/launch_torchrun.sh --config examples/tiny_cpu.toml --tensor-model-parallel-size 2
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_torchrun.sh --config ...   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/launch_torchrun.sh --config ...   # on node 1
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes on this node [number of visible GPUs, else 1]
#   NNODES          nodes in the job [1]
#   NODE_RANK       this node's index [0]
#   MASTER_ADDR     address of node 0 [127.0.0.1]
#   MASTER_PORT     TCP port on node 0 [29500]
#   PYTHON          interpreter [.venv/bin/python if present, else python3]
# All arguments are passed to pretrain_moe.py. The world size is NNODES * NPROC_PER_NODE; the data
# parallel size is world / (tensor x pipeline parallel size). Only global rank 0 prints and logs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" \
  pretrain_moe.py "$@"
