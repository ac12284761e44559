#!/usr/bin/env bash
# zeroshot sweep over a dataset, a modality group or the demo: bash scripts/zeroshot.sh TARGET
# Settings from the environment: DATA, OUTPUT, BACKBONE, METHODS, SEEDS, SHOTS, OPTS, LAUNCHER, SKIP_UNAVAILABLE
# (see scripts/sweep.py for their defaults). Finished runs are reused.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/zeroshot.sh TARGET   (a dataset, a modality group such as fundus or eye, or demo)" >&2
    exit 2
fi
# The interpreter: $PYTHON if set, else python, else python3 (some systems have only python3).
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"
exec "$PYTHON" "$(dirname "$0")/sweep.py" zeroshot "$@"
