"""README.md's Python blocks run as written (in a scratch folder), and print what their comments say."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_and_prints_what_it_says(index, tmp_path):
    code = BLOCKS[index]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # A `print(...)  # expected` line says what it prints: the printed lines must match those comments, in order.
    expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)[ \t]+#[ \t]*(.+)$", code, flags=re.M)]
    printed = [line.strip() for line in result.stdout.splitlines()]
    assert printed == expected, (printed, expected)
