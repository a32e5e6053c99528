#!/usr/bin/env bash
# Bootstrap the project environment: a local .venv with the package installed
# (reused when present and up to date) and the Debian DICOM peers used by the
# tests and the demo (dcmtk, dicom3tools, orthanc, orthanc-dicomweb, chromium, postgresql).
# Sourced by main.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

need_apt=()
command -v storescp  >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy  >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v Orthanc   >/dev/null 2>&1 || need_apt+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS destination tests store into it and query it (QIDO-RS).
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v openssl   >/dev/null 2>&1 || need_apt+=(openssl)    # throw-away CA for the DICOM TLS tests
command -v chromium  >/dev/null 2>&1 || need_apt+=(chromium)   # headless browser for the status page test
# PostgreSQL server binaries for the multi-role tests (a throw-away cluster per test module).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # Orthanc's package starts a system service on install; policy-rc.d keeps it from doing so.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop orthanc 2>/dev/null || true
    $SUDO systemctl stop postgresql 2>/dev/null || true
  fi
  pkill -x Orthanc 2>/dev/null || true
fi

stamp="$VENV/.installed-$(cat "$ROOT/setup.cfg" "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] creating/updating virtual environment in .venv"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # the service plus [test], [onnx] (so CI tests the ONNX Runtime path) and [research] (phantom,
  # radiomics evaluation, plots: the training and evaluation commands and their tests)
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,onnx,research]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# Appended, not prepended: pynetdicom installs storescp/storescu/echoscu scripts into .venv/bin
# that must not shadow DCMTK's tools of the same names.
export PATH="$PATH:$VENV/bin"
# DCMTK and Orthanc from Debian stall ~45 ms per image without it.
export TCP_NODELAY=1
export MPLBACKEND=Agg
