#!/usr/bin/env bash
# zeroshot sweep over a dataset, a modality group or the demo: bash scripts/zeroshot.sh TARGET
# Settings from the environment: DATA, OUTPUT, BACKBONE, METHODS, SEEDS, SHOTS, OPTS
# (see scripts/sweep.py for their defaults). Finished runs are skipped.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/zeroshot.sh TARGET   (a dataset, a modality group such as fundus or eye, or demo)" >&2
    exit 2
fi
# The interpreter: $PYTHON if set, else python3, else python (some systems have only one of them).
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
exec "$PYTHON" "$(dirname "$0")/sweep.py" zeroshot "$@"
