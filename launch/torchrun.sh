#!/usr/bin/env bash
# Thin torchrun wrapper for atscale training (one process per GPU, c10d rendezvous).
#
#   launch/torchrun.sh [--nnodes N] [--nproc-per-node G] [--rdzv-endpoint HOST:PORT] [--node-rank R] \
#                      [--rdzv-id ID] [--dry-run] -- --config CFG [section.key=value ...]
#
# Runs: torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT [--node-rank R]
#                --rdzv-id ID -m atscale.train --config CFG [overrides]
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [options] -- --config CFG [section.key=value ...]

Options (torchrun's; everything after -- goes to `python -m atscale.train`):
  --nnodes N              number of nodes (default 1)
  --nproc-per-node G      processes per node, one per GPU (default: number of visible GPUs, or 1 without GPUs)
  --rdzv-endpoint H:P     c10d rendezvous host:port, the same on every node (default 127.0.0.1:29500)
  --node-rank R           this node's rank (optional with c10d rendezvous)
  --rdzv-id ID            rendezvous id, the same on every node (default: atscale, or $SLURM_JOB_ID)
  --dry-run               print the torchrun command instead of running it
  -h, --help              this text

Run the same command on every node. Examples:
  launch/torchrun.sh -- --config configs/demo.yaml
  launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node01:29500 -- \
      --config configs/imagenet/iat_resnet152.yaml run.name=iat152
EOF
}

NNODES=1
NPROC=""
ENDPOINT="127.0.0.1:29500"
NODE_RANK=""
RDZV_ID="${SLURM_JOB_ID:-atscale}"
DRY_RUN=0

need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then echo "launch/torchrun.sh: $1 needs a value (see -h)" >&2; exit 2; fi; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
    --nnodes=*) NNODES="${1#*=}"; shift ;;
    --nproc-per-node|--nproc_per_node) need_value "$@"; NPROC="$2"; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) NPROC="${1#*=}"; shift ;;
    --rdzv-endpoint|--rdzv_endpoint) need_value "$@"; ENDPOINT="$2"; shift 2 ;;
    --rdzv-endpoint=*|--rdzv_endpoint=*) ENDPOINT="${1#*=}"; shift ;;
    --node-rank|--node_rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
    --node-rank=*|--node_rank=*) NODE_RANK="${1#*=}"; shift ;;
    --rdzv-id|--rdzv_id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
    --rdzv-id=*|--rdzv_id=*) RDZV_ID="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "launch/torchrun.sh: unknown option '$1'; put training arguments after -- (see -h)" >&2; exit 2 ;;
  esac
done

if [ "$#" -eq 0 ]; then
  echo "launch/torchrun.sh: no training arguments; expected -- --config CFG [overrides] (see -h)" >&2
  exit 2
fi

for pair in "nnodes:$NNODES" "nproc-per-node:${NPROC:-1}"; do
  case "${pair#*:}" in
    ''|*[!0-9]*|0) echo "launch/torchrun.sh: --${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2; exit 2 ;;
  esac
done
if [ -n "$NODE_RANK" ]; then
  case "$NODE_RANK" in ''|*[!0-9]*) echo "launch/torchrun.sh: --node-rank must be an integer >= 0" >&2; exit 2 ;; esac
fi
case "$ENDPOINT" in
  *:*) ;;
  *) echo "launch/torchrun.sh: --rdzv-endpoint must look like host:port, got '$ENDPOINT'" >&2; exit 2 ;;
esac

if [ -z "$NPROC" ]; then
  GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    # CUDA_VISIBLE_DEVICES narrows what the processes can see
    GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  fi
  NPROC=$(( GPUS > 0 ? GPUS : 1 ))
fi

# repository root on the import path (python -m atscale.train works without `pip install -e`)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CMD=(torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT"
     --rdzv-id "$RDZV_ID")
if [ -n "$NODE_RANK" ]; then CMD+=(--node-rank "$NODE_RANK"); fi
CMD+=(-m atscale.train "$@")

if [ "$DRY_RUN" -eq 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
