"""The wheel holds every package of the source tree.

`pyproject.toml` lists packages by name, so a new subpackage (the editing package, the calibration
package) that is not added there is silently left out of a non-editable install: the tests pass in
a checkout and `import vlmtrace` fails for users and in CI's clean install.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+, and vlmtrace supports 3.10
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    listed = set(re.findall(r'"([\w.]+)"', block))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "vlmtrace").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "vlmtrace.recipes" in listed and '"vlmtrace.recipes" = "recipes"' in text


def optional_dependencies(extra: str) -> list[str]:
    """The requirements of one extra in pyproject.toml (comments dropped)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(rf"^{extra} = \[(.*?)^\]", text, re.S | re.M).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


def test_the_notebooks_extra_installs_what_the_readme_runs_the_notebooks_with():
    readme = (ROOT / "README.md").read_text()
    names = {re.split(r"[<>=\[]", requirement)[0] for requirement in optional_dependencies("notebooks")}
    assert {"nbconvert", "ipykernel"} <= names
    assert 'pip install ".[notebooks]"' in readme and "jupyter nbconvert --to html --execute" in readme


def test_every_notebook_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks and all(f"notebooks/{path.name}" in readme for path in notebooks)
