#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create, install, train on every worker, tail logs, delete.
#
#   launch/tpu_vm.sh [--dry-run] create  --name NAME --zone ZONE --type v4-32 [--version RUNTIME] [--spot]
#   launch/tpu_vm.sh [--dry-run] install --name NAME --zone ZONE [--repo GIT_URL --ref REF]
#   launch/tpu_vm.sh [--dry-run] run     --name NAME --zone ZONE --workdir gs://BUCKET/run \
#                                        [--config configs/pretrain.py:paper] [-- --config.key=value ...]
#   launch/tpu_vm.sh [--dry-run] logs    --name NAME --zone ZONE [--worker 0]
#   launch/tpu_vm.sh [--dry-run] delete  --name NAME --zone ZONE
#
# `install` copies this checkout (git archive of HEAD) to every worker, or clones --repo when
# given, and installs it with jax[tpu] into a virtual environment there.
# `run` starts the same command on all workers (JAX finds its peers from the TPU metadata, so
# jax.distributed.initialize() needs no arguments); the workdir must be a bucket every worker
# can write. Re-running `run` after a preemption resumes from the latest checkpoint there.
# With --dry-run every gcloud command is printed instead of executed.
set -euo pipefail

DRY_RUN=0
NAME="" ZONE="" TYPE="v4-8" VERSION="tpu-ubuntu2204-base" SPOT=0
REPO="" REF="main"
WORKDIR="" CONFIG="configs/pretrain.py:paper" WORKER="0"
EXTRA=()

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

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
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --repo) REPO="$2"; shift ;;
    --ref) REF="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --worker) WORKER="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done

[[ -n "$NAME" && -n "$ZONE" ]] || { echo "--name and --zone are required" >&2; exit 1; }
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE")
LOG="\$HOME/medunifier_train.log"

case "$ACTION" in
  create)
    CREATE=(gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE"
            --accelerator-type "$TYPE" --version "$VERSION")
    [[ "$SPOT" == 1 ]] && CREATE+=(--spot)
    run "${CREATE[@]}"
    ;;
  install)
    if [[ -n "$REPO" ]]; then
      FETCH="rm -rf medunifier_jax && git clone --depth 1 --branch $(printf '%q' "$REF") \
$(printf '%q' "$REPO") medunifier_jax"
    else
      ARCHIVE="${TMPDIR:-/tmp}/medunifier_jax.tar.gz"
      run git archive --format=tar.gz --prefix=medunifier_jax/ -o "$ARCHIVE" HEAD
      run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:medunifier_jax.tar.gz" \
        --zone "$ZONE" --worker=all
      FETCH="rm -rf medunifier_jax && tar xzf medunifier_jax.tar.gz"
    fi
    SETUP="set -e; $FETCH && cd medunifier_jax && python3 -m venv .venv && \
.venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e . 'jax[tpu]'"
    run "${SSH[@]}" --worker=all --command "$SETUP"
    ;;
  run)
    [[ -n "$WORKDIR" ]] || { echo "run needs --workdir (a gs:// path all workers share)" >&2; exit 1; }
    ARGS=""
    for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do ARGS+=" $(printf '%q' "$a")"; done
    TRAIN="cd medunifier_jax && nohup .venv/bin/python -m medunifier_jax.train \
--config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$ARGS > $LOG 2>&1 &"
    run "${SSH[@]}" --worker=all --command "$TRAIN"
    ;;
  logs)
    run "${SSH[@]}" --worker="$WORKER" --command "tail -n 200 -F $LOG"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
    ;;
  *)
    echo "unknown action: $ACTION" >&2; usage ;;
esac
