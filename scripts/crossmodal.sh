#!/usr/bin/env bash
# Cross-modal transfer: MedPromptCLIP trained on the descriptions of POOL (a modality group or all),
# evaluated on every dataset of TARGET next to zero-shot CLIP (template and description ensemble).
#   bash scripts/crossmodal.sh TARGET [POOL]      (POOL defaults to TARGET)
# Settings from the environment: DATA, OUTPUT, BACKBONE, SEEDS, OPTS, LAUNCHER, SKIP_UNAVAILABLE (see scripts/sweep.py).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/crossmodal.sh TARGET [POOL]" >&2
    exit 2
fi
# The interpreter: $PYTHON if set, else python, else python3 (some systems have only python3).
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"
exec "$PYTHON" "$(dirname "$0")/sweep.py" crossmodal "$@"
