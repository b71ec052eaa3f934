"""The shape of the code holds: the packages of medcls import only their own rank and the ranks
below it (the ```layers block of docs/ARCHITECTURE.md), no two modules import each other
through any chain (function-level imports included), no private name crosses a module, no
module is over 600 lines, medcls never imports streamlit or the app, and the package maps in
docs/ARCHITECTURE.md and the README are the tree's own (docs/tree.py)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "docs"))
import tree as doc_tree  # noqa: E402

MAX_LINES = 600


# ----------------------------------------------------------------------------- the checker

def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import of ``path``,
    top level or inside functions; relative imports resolved; ``from pkg import module``
    counted as an import of that module."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = root.parent / Path(*f"{base}.{a.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    found.append((f"{base}.{a.name}", None, node.lineno))
                else:
                    found.append((base, a.name, node.lineno))
    return found


def check_tree(root: Path, ranks: list[str], forbidden: tuple[str, ...] = ("streamlit", "ui", "app", "pages")) -> list[str]:
    """Every breach of the rules in the package at ``root`` (e.g. ``medcls/``), in words;
    ``forbidden``: top-level packages it must never import."""
    top = root.name
    rank = {name: i for i, name in enumerate(ranks)}
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    problems, edges = [], {m: set() for m in modules}
    for name, path in modules.items():
        parts = name.split(".")
        own = parts[1] if len(parts) > 1 and parts[1] in rank else None
        if len(parts) > 1 and parts[1] not in rank and path.parent != root:
            problems.append(f"{name}: package {parts[1]!r} has no rank in the layers block")
        n_lines = len(path.read_text().splitlines())
        if n_lines > MAX_LINES:
            problems.append(f"{name}: {n_lines} lines (more than {MAX_LINES})")
        for target, imported, line in imports(path, root):
            root_name = target.split(".")[0]
            if root_name in forbidden:
                problems.append(f"{name}:{line} imports {target} (never imported here)")
            if root_name != top:
                continue
            if target == top and path.parent != root:
                problems.append(f"{name}:{line} imports from the top-level package {top!r}")
            if target not in modules and f"{target}" not in modules:
                continue
            edges[name].add(target)
            tparts = target.split(".")
            if own is not None and len(tparts) > 1 and tparts[1] in rank and rank[tparts[1]] > rank[own]:
                problems.append(f"{name}:{line} ({own}) imports {target} ({tparts[1]}, a higher rank)")
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                problems.append(f"{name}:{line} imports the private name {imported} of {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (and modules importing
    themselves), each as a closed path (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                out.append(sorted(group) + [sorted(group)[0]])
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


# ----------------------------------------------------------------------------- the rules hold

def test_medcls_holds_the_rules():
    assert check_tree(PROJECT_ROOT / "medcls", doc_tree.ranks()) == []


def test_every_package_has_a_rank_and_a_sentence():
    ranks = doc_tree.ranks()
    packages = sorted(p.name for p in (PROJECT_ROOT / "medcls").iterdir() if (p / "__init__.py").is_file())
    assert sorted(ranks) == packages
    for folder in [PROJECT_ROOT / "ui"] + [PROJECT_ROOT / "medcls" / p for p in packages]:
        for module in folder.rglob("*.py"):
            assert doc_tree.first_sentence(module), f"{module} has no docstring"


def test_the_app_package_has_no_cycles_and_no_private_imports():
    """``ui`` (the pages' helpers) may import any of medcls, but its own modules form no cycle."""
    problems = check_tree(PROJECT_ROOT / "ui", [], forbidden=("app", "pages"))
    assert problems == []


def test_the_maps_in_the_docs_are_the_trees():
    """docs/ARCHITECTURE.md and the README show the package map docs/tree.py makes from the
    docstrings (run ``python docs/tree.py`` after adding or renaming a module)."""
    for path in doc_tree.FILES:
        assert doc_tree.current(path) == doc_tree.block(), f"{path.name}: run python docs/tree.py"


def test_saliency_imports_nothing_of_inference():
    code = ("import sys, medcls.models.saliency; "
            "assert 'medcls.engine.inference' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


def test_cli_lists_every_subcommand(capsys):
    """A broken import fails loudly instead of silently removing a subcommand."""
    from medcls.cli.main import main

    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for command in ("train", "evaluate", "fit-region", "train-seg", "fit-seg", "clean", "review",
                    "pacs", "adapt", "audit"):
        assert command in usage


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py and the helper modules; a test module
    importing another would run its tests' module code twice."""
    for path in sorted((PROJECT_ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {d for d in names if d.split(".")[-1].startswith("test_")}, path.name


def test_tests_mirror_the_packages_and_no_fixture_is_written_twice():
    """Each package of medcls has its folder of tests; a fixture name is defined once in the whole
    suite (no module's fixture shadows conftest's or another's of the same name)."""
    tests = PROJECT_ROOT / "tests"
    for package in doc_tree.ranks():
        if package != "cli":  # the commands are tested with the code they call
            assert list((tests / package).glob("test_*.py")), f"tests/{package}/ has no tests"
    seen: dict[str, str] = {}
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "fixture" in ast.unparse(d) for d in node.decorator_list):
                where = str(path.relative_to(tests))
                assert node.name not in seen, f"fixture {node.name!r} in {where} and {seen[node.name]}"
                seen[node.name] = where


# ----------------------------------------------------------------------------- the checker fails

@pytest.fixture()
def tree_copy(tmp_path) -> Path:
    """A copy of medcls's sources to break on purpose."""
    copy = tmp_path / "medcls"
    shutil.copytree(PROJECT_ROOT / "medcls", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _add(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_checker_sees_a_function_level_cycle(tree_copy):
    assert check_tree(tree_copy, doc_tree.ranks()) == []
    _add(tree_copy / "io" / "scan.py", "def _late():\n    from medcls.io.load import load_scan\n    return load_scan")
    problems = check_tree(tree_copy, doc_tree.ranks())
    assert any(p.startswith("import cycle:") and "medcls.io.load" in p and "medcls.io.scan" in p
               for p in problems), problems


def test_checker_sees_a_private_import_and_a_relative_one(tree_copy):
    _add(tree_copy / "io" / "raster.py", "from .budget import _decode_settings")
    problems = check_tree(tree_copy, doc_tree.ranks())
    assert any("private name _decode_settings" in p for p in problems), problems


def test_checker_sees_a_higher_rank_import_and_streamlit(tree_copy):
    _add(tree_copy / "core" / "errors.py", "def f():\n    import streamlit\n    from medcls.engine import present")
    problems = check_tree(tree_copy, doc_tree.ranks())
    assert any("(core) imports medcls.engine.present (engine, a higher rank)" in p for p in problems), problems
    assert any("imports streamlit" in p for p in problems), problems


def test_checker_sees_a_long_module(tree_copy):
    (tree_copy / "engine" / "long.py").write_text('"""Long."""\n' + "x = 1\n" * 650)
    assert any("650" in p or "651" in p for p in check_tree(tree_copy, doc_tree.ranks()))
