"""A skip for a missing optional dependency or missing real data says it one way, the way tests/helpers.py does."""
import ast
import pathlib

import helpers

TESTS = pathlib.Path(__file__).resolve().parent
# Words of a skip message about a missing package or data set; such messages belong in helpers.py.
DEPENDENCY_WORDS = ("install", "JAXSEQ_SHARED_DATA", "KERAS_BACKEND", "shared/data", "extra")


def _skip_calls(tree):
    """(line, function, its string arguments) of every call to pytest.skip / importorskip / mark.skipif."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("importorskip", "pytest.skip", "skipif")):
                texts = [arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg)
                         for arg in [*node.args, *(k.value for k in node.keywords)]
                         if isinstance(arg, (ast.Constant, ast.JoinedStr))]
                yield node.lineno, name, texts


def test_skip_messages_for_dependencies_come_from_the_helpers():
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "helpers.py":
            continue
        for line, name, texts in _skip_calls(ast.parse(path.read_text(encoding="utf-8"))):
            if name.endswith("importorskip") and not (texts and str(texts[0]).startswith("jaxseq")):
                offenders.append(f"{path.name}:{line}: {name}(...): use helpers.import_or_skip")
            elif any(word in str(text) for text in texts for word in DEPENDENCY_WORDS):
                offenders.append(f"{path.name}:{line}: own message {texts}: use a message from helpers.py")
    assert not offenders, "\n".join(offenders)


def test_each_message_names_its_extra_and_real_data_names_the_variable():
    for module, message in helpers.MISSING.items():
        assert message.endswith("')") and "pip install -e '.[" in message, module
    assert "set JAXSEQ_SHARED_DATA to the folder with the real data sets" in helpers.REAL_DATA
