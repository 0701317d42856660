"""mathtune.generation is a leaf package: its modules import nothing else from mathtune."""

import ast
from pathlib import Path

import pytest

from mathtune import generation

PACKAGE = Path(generation.__file__).resolve().parent


def mathtune_imports(source: str) -> list[str]:
    """Absolute mathtune modules imported anywhere in the source (function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [f"{node.module}.{alias.name}" if node.module == "mathtune" else node.module for alias in node.names]
    return [name for name in found if name.split(".")[0] == "mathtune"]


def test_the_import_reader_sees_local_and_package_imports():
    source = "import os\nfrom mathtune import data\ndef f():\n    from mathtune.generation.head import x\n"
    assert mathtune_imports(source) == ["mathtune.data", "mathtune.generation.head"]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_generation_module_imports_the_rest_of_mathtune(path):
    outside = [m for m in mathtune_imports(path.read_text()) if not m.startswith("mathtune.generation")]
    assert outside == [], f"{path.name} imports {outside}"
