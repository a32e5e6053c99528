#!/usr/bin/env bash
# The main job: end-to-end demo on the embedded phantom (bootstraps .venv on first use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m nodetools.demo "$@"
