#!/usr/bin/env bash
# The documentation site: API reference from the docstrings, the guides in docs/, and every notebook in
# notebooks/ executed (JAXSEQ_QUICK=1 unless set) — into docs/_build/html. Any Sphinx warning fails the build.
# Usage: scripts/build_docs.sh   (PYTHON overrides the interpreter; needs `pip install -e ".[docs]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
SECONDS=0
# -T: when a notebook cell fails, its traceback is printed here rather than only into a file under /tmp.
"$PYTHON" -m sphinx -W --keep-going -T -b html docs docs/_build/html
printf 'build_docs: %s s, site in docs/_build/html/index.html\n' "$SECONDS"
