#!/usr/bin/env bash
# The declared dependency floors, tested: install jaxseq with every direct dependency at the lowest version
# pyproject.toml allows (uv's --resolution lowest-direct), print what resolved, run a fast subset of the suite.
# A floor that this passes with is a floor that means something; raise one when a change needs a newer API.
#
# Usage: scripts/check_floors.sh [extra pytest args]
#   FLOORS_VENV=dir  build the venv there and keep it (default: a temporary folder, removed at the end)
#   PYTHON=python3   the interpreter to build it from (the lowest Python that pyproject allows is the best test)
# Needs the package index (PyPI). Torch (the parity extra) is left out: pip would fetch it from the index, and
# uv would pick a CUDA build; the parity tests skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
venv="${FLOORS_VENV:-}"
if [[ -z "$venv" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  venv="$tmp/venv"
fi
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip uv
"$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" --resolution lowest-direct -e ".[test]"
echo "resolved at the floors ($(( SECONDS - start )) s to install):"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import platform
print(f"  python {platform.python_version()}")
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "pillow", "matplotlib",
             "sacrebleu", "tqdm", "pytest", "pytest-xdist", "keras", "h5py", "pycocoevalcap"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (not installed)")
EOF
# A subset that touches every floor: scan/cells/layers (jax.typeof, lax.pcast under shard_map), BPTT against
# autodiff, the training loop (optax, orbax checkpoints and exact resume, matplotlib, tqdm) on one process and
# on two (jax.distributed, gloo); then one or a few tests for each other dependency: flax modules, the native
# kernel under vmap (jax.ffi.ffi_call's vmap_method), Keras weight import (keras, h5py), BLEU (sacrebleu),
# CIDEr-D (pycocoevalcap), image files (pillow) and the torch-free weights reader (ml_dtypes).
"$venv/bin/python" -m pytest -q -p no:cacheprovider -n 0 -x \
  tests/test_scan.py tests/test_layers.py tests/test_bptt.py tests/test_training.py tests/test_distributed.py "$@"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -n 0 -x \
  tests/test_nn.py tests/test_native.py tests/test_interop.py tests/test_translation.py tests/test_captioning.py \
  tests/test_encoders.py -k "test_nn or vmap_and_shard_map or keras or bleu or cider or extract_features_batches \
  or rejects_other_files or refuses_a_pickle" "$@"
echo "floors check passed in $(( SECONDS - start )) s"
