"""The API reference covers the package, read from the files (no Sphinx build, no imports; the full -W build runs in
CI through scripts/build_docs.sh):

* every public module under jaxseq/ (no ``_`` in its path; the command line ``cli``, ``commands`` and ``tour`` are
  documented in the guides instead) has ``docs/api/<module>.md`` with its ``automodule`` directive, and that page
  is in the API index's toctree, so a new module cannot be left out of the site;
* no API page documents a module that no longer exists;
* a package that re-exports names (``__all__`` of imported names) lists each of them on its page.
"""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxseq"
API = ROOT / "docs" / "api"
NOT_IN_REFERENCE = {"cli", "commands", "tour"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def public_modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        parts = name.split(".")
        if any(p.startswith("_") for p in parts) or (len(parts) > 1 and parts[1] in NOT_IN_REFERENCE):
            continue
        found[name] = path
    return found


def api_pages() -> dict[str, str]:
    return {p.stem: p.read_text() for p in API.glob("jaxseq*.md")}


def test_every_public_module_has_an_api_page_in_the_index():
    modules, pages = public_modules(), api_pages()
    assert {"jaxseq", "jaxseq.layers", "jaxseq.training.loop", "jaxseq.tasks.caption"} <= set(modules)
    missing = sorted(m for m in modules if m not in pages)
    assert not missing, f"modules without a page in docs/api/ (add docs/api/<module>.md): {missing}"
    for name in modules:
        assert re.search(rf"^\.\. automodule:: {re.escape(name)}$", pages[name], re.M), \
            f"docs/api/{name}.md does not run automodule on {name}"
    index = (API / "index.md").read_text()
    listed = set(re.findall(r"^(jaxseq[\w.]*)$", index, re.M))
    assert not set(modules) - listed, f"pages missing from docs/api/index.md: {sorted(set(modules) - listed)}"


def test_no_api_page_for_a_module_that_is_gone():
    stale = sorted(set(api_pages()) - set(public_modules()))
    assert not stale, f"docs/api/ pages for modules that do not exist (or are excluded): {stale}"


def _all_names(path: pathlib.Path) -> list[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


def test_re_exported_names_are_listed_on_the_package_page():
    pages = api_pages()
    checked = 0
    for name, path in public_modules().items():
        if path.name != "__init__.py":
            continue
        for exported in _all_names(path):
            checked += 1
            assert f"`{name}.{exported} <" in pages[name], \
                f"docs/api/{name}.md does not list {name}.{exported} (re-exported in its __all__)"
    assert checked >= 10  # jaxseq, jaxseq.training and jaxseq.encoders re-export
