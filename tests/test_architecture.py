"""The layers of docs/ARCHITECTURE.md hold: every import in medcls goes to its own or a lower
layer (read from the document's ```layers block), medcls never imports streamlit or the app,
and saliency knows a model, not a predictor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT


def test_saliency_imports_nothing_of_inference():
    code = ("import sys, medcls.saliency; "
            "assert 'medcls.inference' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


# ----------------------------------------------------------------------------- import rules

DOC = PROJECT_ROOT / "docs" / "ARCHITECTURE.md"
MEDCLS = PROJECT_ROOT / "medcls"


def layers() -> dict[str, int]:
    """Module name -> layer rank, from the ```layers block of docs/ARCHITECTURE.md."""
    text = DOC.read_text()
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    ranks = {}
    for rank, line in enumerate(filter(None, block.splitlines())):
        _, modules = line.split(":", 1)
        for name in modules.split():
            assert name not in ranks, f"{name} is listed twice in {DOC.name}"
            ranks[name] = rank
    return ranks


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top level or inside functions), as dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside medcls
                base = "medcls" + (f".{node.module}" if node.module else "")
                found.update({base} if node.module else {f"medcls.{a.name}" for a in node.names})
            elif node.module:
                found.add(node.module)
                if node.module == "medcls":
                    found.update(f"medcls.{a.name}" for a in node.names
                                 if (MEDCLS / f"{a.name}.py").is_file())
    return found


def medcls_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "medcls":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    ranks = layers()
    missing = [p.stem for p in MEDCLS.glob("*.py") if p.stem not in ranks]
    assert not missing, f"add {missing} to the layers block of docs/ARCHITECTURE.md"


def test_lower_layers_never_import_higher_ones():
    ranks = layers()
    names = {rank: name for name, rank in ranks.items()}
    bad = []
    for path in sorted(MEDCLS.glob("*.py")):
        own = ranks.get(path.stem)
        for dep in imports(path):
            target = medcls_module(dep)
            if target is not None and own is not None and ranks.get(target, -1) > own:
                bad.append(f"{path.stem} ({names[own]}) imports {target}")
    assert not bad, bad


def test_medcls_never_imports_streamlit_or_the_app():
    for path in sorted(MEDCLS.glob("*.py")):
        for dep in imports(path):
            root = dep.split(".")[0]
            assert root not in ("streamlit", "ui", "app", "pages"), f"{path.name} imports {dep}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """Control: the parser finds what a violation would look like."""
    sample = tmp_path / "sample.py"
    sample.write_text("from .inference import Predictor\nfrom . import review\n"
                      "def f():\n    import streamlit as st\n    from medcls import report\n")
    assert {"medcls.inference", "medcls.review", "streamlit", "medcls.report"} <= imports(sample)
    ranks = layers()
    assert ranks["saliency"] < ranks["inference"] and ranks["errors"] < ranks["scan"]


def test_cli_lists_every_subcommand(capsys):
    """A broken import fails loudly instead of silently removing a subcommand."""
    import pytest

    from medcls.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for command in ("train", "evaluate", "fit-region", "clean", "review"):
        assert command in usage


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py, apptest.py, appserver.py and
    dicom_factory.py; a test module importing another would run its tests' module code twice."""
    for path in sorted((PROJECT_ROOT / "tests").glob("test_*.py")):
        others = {d for d in imports(path) if d.split(".")[0].startswith("test_")}
        assert not others, f"{path.name} imports {sorted(others)}"
