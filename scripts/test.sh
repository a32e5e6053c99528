#!/usr/bin/env bash
# Run the test suite (bootstraps .venv and the DICOM peers on first use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
