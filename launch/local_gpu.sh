#!/usr/bin/env bash
# Local machine with one or more GPUs: install, train, tail logs.
#
#   launch/local_gpu.sh [--dry-run] install
#   launch/local_gpu.sh [--dry-run] run  --workdir DIR [--config configs/pretrain.py:small] \
#                                        [--gpus 0,1,2,3] [-- --config.key=value ...]
#   launch/local_gpu.sh [--dry-run] logs --workdir DIR
#
# One process drives every visible GPU (JAX's single-controller model); the default mesh
# [('data', -1), ('model', 1)] splits the batch over all of them. Re-running `run` resumes from
# the workdir's latest checkpoint. With --dry-run the commands are printed, not executed.
set -euo pipefail

DRY_RUN=0
WORKDIR="" CONFIG="configs/pretrain.py:small" GPUS="" VENV="${VENV:-.venv}"
EXTRA=()

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

[[ "${1:-}" == "--dry-run" ]] && { DRY_RUN=1; shift; }
ACTION="${1:-}"; [[ -n "$ACTION" ]] || usage
[[ "$ACTION" == "-h" || "$ACTION" == "--help" ]] && usage 0
shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --workdir) WORKDIR="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --gpus) GPUS="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done

case "$ACTION" in
  install)
    run python3 -m venv "$VENV"
    run "$VENV/bin/pip" install --quiet -e . 'jax[cuda12]'
    ;;
  run)
    [[ -n "$WORKDIR" ]] || { echo "run needs --workdir DIR" >&2; exit 1; }
    run mkdir -p "$WORKDIR"
    ENV=(env)
    [[ -n "$GPUS" ]] && ENV+=("CUDA_VISIBLE_DEVICES=$GPUS")
    CMD=("${ENV[@]}" "$VENV/bin/python" -m medunifier_jax.train --config "$CONFIG"
         --workdir "$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")
    if [[ "$DRY_RUN" == 1 ]]; then
      printf '%q ' "${CMD[@]}"; printf '2>&1 | tee -a %q\n' "$WORKDIR/train.log"
    else
      "${CMD[@]}" 2>&1 | tee -a "$WORKDIR/train.log"
    fi
    ;;
  logs)
    [[ -n "$WORKDIR" ]] || { echo "logs needs --workdir DIR" >&2; exit 1; }
    run tail -n 200 -F "$WORKDIR/train.log"
    ;;
  *)
    echo "unknown action: $ACTION" >&2; usage ;;
esac
