"""The package map of docs/ARCHITECTURE.md and README.md, generated from the tree.

``python docs/tree.py`` rewrites the block between ``<!-- tree:begin -->`` and
``<!-- tree:end -->`` in both files from the packages' and modules' own docstrings (their first
sentence); ``tests/test_architecture.py`` checks that the files hold what this prints, so the
map cannot drift from the code.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = (ROOT / "docs" / "ARCHITECTURE.md", ROOT / "README.md")
BEGIN, END = "<!-- tree:begin -->", "<!-- tree:end -->"


def ranks(doc: Path = FILES[0]) -> list[str]:
    """The subpackages of medcls from the lowest rank to the highest (the ```layers block)."""
    block = doc.read_text().split("```layers\n", 1)[1].split("```", 1)[0]
    return [line.split(":")[0].strip() for line in block.splitlines() if line.strip()]


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    para = " ".join(doc.split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?([^`]+)`", r"\1", para).replace("``", "`")  # Sphinx roles as plain names
    match = re.search(r"(?<![.:][a-z])\.(\s|$)", para)
    return para[:match.start() + 1] if match else para


def tree(root: Path = ROOT) -> str:
    """The map: each package of medcls in rank order with its sentence, its modules beneath,
    then the app's ``ui`` package."""
    lines = []
    width = 30

    def package(folder: Path, title: str, indent: str = "") -> None:
        lines.append(f"{indent}{title:<{width - len(indent)}}{first_sentence(folder / '__init__.py')}")
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py":
                lines.append(f"{indent}  {module.name:<{width - len(indent) - 2}}{first_sentence(module)}")
        for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
            package(sub, f"{sub.name}/", indent + "  ")
    for name in ranks(root / "docs" / "ARCHITECTURE.md"):
        package(root / "medcls" / name, f"medcls/{name}/")
    package(root / "ui", "ui/")
    return "\n".join(lines)


def block() -> str:
    return f"{BEGIN}\n```\n{tree()}\n```\n{END}"


def current(path: Path) -> str:
    text = path.read_text()
    return text[text.index(BEGIN):text.index(END) + len(END)]


def write() -> None:
    for path in FILES:
        text = path.read_text()
        path.write_text(text.replace(current(path), block()))


if __name__ == "__main__":
    write() if "--check" not in sys.argv else sys.exit(any(current(p) != block() for p in FILES))
