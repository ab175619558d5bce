"""Sphinx configuration: the API reference from the docstrings, the guides and the executed notebooks.

Build with `scripts/build_docs.sh` (warnings are errors). Sphinx + autodoc + napoleon + myst-nb +
sphinx-book-theme is the tooling JAX, Flax and Optax use, so the reference reads like theirs.
"""
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# autodoc imports this checkout's jaxseq, and so does the notebook kernel (a subprocess that inherits the
# environment), whether or not jaxseq is installed.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# The notebooks read JAXSEQ_QUICK=1 to run small; a caller may still ask for the full runs with JAXSEQ_QUICK=0.
os.environ.setdefault("JAXSEQ_QUICK", "1")

# The notebooks live at the repository root (notebooks/, committed without outputs); Sphinx only reads sources
# under docs/, so they are copied into the ignored docs/notebooks/ on every build (none is fine). The copies are
# new files each time, so even an incremental build re-executes every notebook against the library as it is now.
_notebooks = DOCS / "notebooks"
shutil.rmtree(_notebooks, ignore_errors=True)
_notebooks.mkdir()
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy(_nb, _notebooks / _nb.name)
if not any(_notebooks.iterdir()):
    # index.md's glob must match something (an empty glob is a warning, so an error here).
    (_notebooks / "none.md").write_text("# No notebooks\n\nThis checkout has no notebooks in `notebooks/`.\n")

project = "jaxseq"
author = "jaxseq authors"
copyright = "jaxseq authors"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# Some docstrings (jaxseq.training) write code in single backticks, as in Markdown; reST's default role would set
# it in italics.
default_role = "code"

# autodoc: the public names only, in source order, with type hints in the description rather than the signature
# (the signatures of the layers would otherwise run to several lines).
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True,
                           "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" sections become fields of their class; as attribute directives they would describe each field of
# a NamedTuple or dataclass a second time, beside the member autodoc finds.
napoleon_use_ivar = True

# Notebooks: executed on every build, so a notebook that no longer runs fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True

html_theme = "sphinx_book_theme"
html_title = "jaxseq"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2}
