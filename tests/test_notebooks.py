"""The chapter notebooks are committed clean and use only the public API; the docs build executes them.

Cheap checks of the stored JSON only (nothing here runs a notebook): nbformat 4 with the python3 kernel, no
outputs or execution counts, the JAXSEQ_QUICK switch, no private jaxseq names, and one notebook per chapter.
"""
import ast
import json
import pathlib
import re

import pytest

from helpers import import_or_skip

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
# Each chapter's notebook, by how its file name starts (the Bitcoin exercise by its topic).
CHAPTERS = {"RNN and BPTT": r"16_", "LSTM and vanishing gradients": r"17_", "image captioning": r"18_",
            "seq2seq and attention": r"19_", "Bitcoin exercise": r".*bitcoin"}


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _code(notebook: dict) -> str:
    """The code cells as one Python module: IPython magics (`%matplotlib inline`) become comments."""
    cells = [_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]
    return "\n".join(re.sub(r"^(\s*)([%!])", r"\1# \2", cell, flags=re.M) for cell in cells)


def private_jaxseq_names(code: str) -> list[str]:
    """`._name` reached through a jaxseq module (however it was imported) and `_name` imported from jaxseq."""
    tree = ast.parse(code)
    modules = set()  # local names bound to jaxseq or one of its modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jaxseq":
                    modules.add(alias.asname or "jaxseq")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxseq":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_every_chapter_has_a_notebook():
    names = [p.name for p in PATHS]
    missing = [chapter for chapter, pattern in CHAPTERS.items() if not any(re.match(pattern, n) for n in names)]
    assert not missing, f"no notebook for {missing} in {NOTEBOOKS} (found {names})"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_notebook_is_clean_nbformat_4(path):
    notebook = _load(path)
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert notebook["cells"] and notebook["cells"][0]["cell_type"] == "markdown"
    for index, cell in enumerate(notebook["cells"]):
        assert cell["cell_type"] in ("markdown", "code"), f"cell {index}: {cell['cell_type']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {index} of {path.name} holds outputs: clear them before committing"
            assert cell["execution_count"] is None, f"cell {index} of {path.name} holds an execution count"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_notebook_validates_against_the_nbformat_schema(path):
    nbformat = import_or_skip("nbformat")
    nbformat.validate(nbformat.read(str(path), as_version=4))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_notebook_says_how_to_run_and_has_the_quick_switch(path):
    notebook = _load(path)
    intro = _source(notebook["cells"][0])
    assert "pip install" in intro and "JAXSEQ_QUICK=1" in intro, f"{path.name}: the first cell must say how to run it"
    code = _code(notebook)
    assert 'os.environ.get("JAXSEQ_QUICK") == "1"' in code, f"{path.name} has no JAXSEQ_QUICK switch"
    assert "jax.devices()" in code, f"{path.name} does not print the device it runs on"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_notebook_uses_only_public_names_and_no_outside_paths(path):
    notebook = _load(path)
    code = _code(notebook)
    assert private_jaxseq_names(code) == [], f"{path.name} uses private jaxseq names"
    text = "\n".join(_source(c) for c in notebook["cells"])
    for outside in ("../shared", "/work/", "savefig("):
        assert outside not in text, f"{path.name} contains {outside!r}"


def test_private_name_check_catches_what_it_should():
    code = ("import jaxseq\nfrom jaxseq import cells as c\nimport jaxseq.bptt as b\nfrom jaxseq.attention import _glorot\n"
            "jaxseq._x\nc._y.z\nb._rnn_forward()\njaxseq.cells.lstm\nc.__doc__\n")
    assert private_jaxseq_names(code) == ["from jaxseq.attention import _glorot", "jaxseq._x (line 5)",
                                          "c._y (line 6)", "b._rnn_forward (line 7)"]
