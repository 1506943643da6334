#!/usr/bin/env bash
# TensorBoard on a model dir (local or gs://), bound to localhost only.
#   launch/tensorboard.sh runs                      # every local run
#   launch/tensorboard.sh gs://BUCKET/tfadv/runs 6007
# From a laptop, reach a remote machine's TensorBoard with an SSH tunnel:
#   ssh -L 6006:localhost:6006 HOST  (or gcloud compute tpus tpu-vm ssh NAME -- -L 6006:localhost:6006)
set -euo pipefail
LOGDIR="${1:?usage: launch/tensorboard.sh MODEL_DIR [PORT]}"
PORT="${2:-6006}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
TB="$HERE/.venv/bin/tensorboard"
[ -x "$TB" ] || TB="tensorboard"
exec "$TB" --logdir "$LOGDIR" --host localhost --port "$PORT"
