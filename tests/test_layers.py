"""The dependency direction of STYLE.md: the engine never imports algorithms, data or training."""
import ast
import pathlib

import pytest

import metann

PACKAGE = pathlib.Path(metann.__file__).parent

# module (relative to metann/) -> metann subpackages it must not import
FORBIDDEN = {
    "dependent.py": {"learner", "functional", "meta", "data", "train", "cli", "optim"},
    "learner.py": {"functional", "meta", "data", "train", "cli"},
    "functional.py": {"meta", "data", "train", "cli"},
    "optim.py": {"dependent", "learner", "functional", "meta", "data", "train", "cli"},
    "utils.py": {"dependent", "learner", "functional", "meta", "data", "train", "cli", "optim"},
    "meta": {"data", "train", "cli"},
    "data": {"dependent", "learner", "functional", "meta", "train", "cli", "optim"},
    "train.py": {"cli"},
}


def metann_imports(path: pathlib.Path) -> set[str]:
    """First component under `metann` of every import in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    relative_base = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = relative_base[: len(relative_base) - (node.level - 1)]
                names = [".".join(("metann", *base, node.module or ""))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "metann" and len(parts) > 1 and parts[1]:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("target", sorted(FORBIDDEN))
def test_no_forbidden_imports(target):
    path = PACKAGE / target
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    assert files, f"{target} not found"
    for file in files:
        own = file.relative_to(PACKAGE).parts[0].removesuffix(".py")
        bad = (metann_imports(file) - {own}) & FORBIDDEN[target]
        assert not bad, f"{file.relative_to(PACKAGE)} imports {sorted(bad)}, against the dependency direction"
