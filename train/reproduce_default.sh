#!/usr/bin/env bash
# Rebuild the shipped checkpoints (linear = the default model, ltdiff, direct) from phantom data.
# Usage: [ABLATION=1] train/reproduce_default.sh [PYTHON]   (run from the repository root)
# Held-out evaluation data uses seed 900 and 3 mm slices: never train on it.
set -euo pipefail
PY=${1:-.venv/bin/python}
mkdir -p data runs
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

[ -d data/train ]    || $PY -m ltdiff_train.make_phantom --out data/train    --cases 8 --slices 12 --seed 100 --thickness 1.5
[ -d data/train1mm ] || $PY -m ltdiff_train.make_phantom --out data/train1mm --cases 4 --slices 12 --seed 200 --thickness 1.0
stamp "data ready"
$PY -m ltdiff_train.fit_linear      --config conf/train-linear.toml      ; stamp "linear done"
$PY -m ltdiff_train.fit_autoencoder --config conf/train-autoencoder.toml ; stamp "autoencoder done"
$PY -m ltdiff_train.fit_direct      --config conf/train-direct.toml      ; stamp "direct done"
$PY -m ltdiff_train.fit_diffusion   --config conf/train-diffusion.toml   ; stamp "diffusion done"

if [ "${ABLATION:-0}" = 1 ]; then  # "diffusion without the multiscale design"
  $PY -m ltdiff_train.fit_autoencoder --config conf/train-autoencoder-bottleneck.toml ; stamp "ablation autoencoder done"
  $PY -m ltdiff_train.fit_diffusion   --config conf/train-diffusion-bottleneck.toml   ; stamp "ablation diffusion done"
fi

names="ltdiff linear direct"
[ "${ABLATION:-0}" = 1 ] && names="$names ltdiff-bottleneck"
for name in $names; do
  cp runs/$name.safetensors runs/$name.json ltdiff_core/weights/
done
stamp "copied checkpoints to ltdiff_core/weights/"
# QA training envelope (training.qa_envelope) from the DICOM training cases, with their SliceThickness;
# tensors are untouched. A new checkpoint is stamped with the same one line.
ckpts=""
for name in $names; do ckpts="$ckpts --checkpoint ltdiff_core/weights/$name.safetensors"; done
$PY -m ltdiff_train.envelope --cases data/train --cases data/train1mm $ckpts ; stamp "QA envelope stamped"
