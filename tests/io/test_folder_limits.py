"""Server folders say nothing a visitor should not learn: a folder nested 1,500 levels deep is a
clear message (not RecursionError), and a path that does not exist and one outside the scan
folder get the same sentence."""

from __future__ import annotations

import os

import pytest

from medcls.core.errors import PathNotAllowedError
from medcls.io.sources import MAX_FOLDER_DEPTH, folder_sources, resolve_inside


def _deep(root, levels: int):
    cwd = os.getcwd()
    os.chdir(root)
    try:  # relative steps: the absolute path would pass PATH_MAX well before 1,500 levels
        for _ in range(levels):
            os.mkdir("a")
            os.chdir("a")
        with open("scan.png", "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n")
    finally:
        os.chdir(cwd)


def _remove_deep(root, levels: int) -> None:
    """Remove what :func:`_deep` made, bottom up (shutil.rmtree recurses, and so would
    pytest's clean-up of its temporary folders)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for _ in range(levels):
            os.chdir("a")
        os.unlink("scan.png")
        for _ in range(levels):
            os.chdir("..")
            os.rmdir("a")
    finally:
        os.chdir(cwd)


def test_a_folder_1500_levels_deep_is_a_clear_message(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    _deep(root, 1500)
    try:
        with pytest.raises(PathNotAllowedError, match=f"more than {MAX_FOLDER_DEPTH} levels deep"):
            folder_sources(root, ".")
    finally:
        _remove_deep(root, 1500)


def test_folders_within_the_depth_are_walked_in_order(tmp_path):
    root = tmp_path / "scans"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    for rel in ("z.png", "b/y.png", "b/c/x.png", "a/w.png", ".hidden/v.png", "a/.dot.png"):
        (root / rel).write_bytes(b"x")
    os.symlink(root / "b", root / "link-to-b")  # a link to a folder is not followed
    _deep(root / "a", MAX_FOLDER_DEPTH - 1)
    names = [s.name for s in folder_sources(root, ".")]
    # top-down as os.walk gave them: a folder's files, then its subfolders in name order
    assert names == ["z.png", "a/w.png", "a/" * MAX_FOLDER_DEPTH + "scan.png", "b/y.png",
                     "b/c/x.png"]


def test_missing_and_outside_paths_say_the_same(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    (tmp_path / "secret-folder").mkdir()
    messages = set()
    for path in ("no-such-folder", "../secret-folder", "../no-such-folder", "/etc", "/nonexistent",
                 str(tmp_path / "secret-folder")):
        with pytest.raises(PathNotAllowedError) as err:
            resolve_inside(root, path)
        messages.add(str(err.value))
        with pytest.raises(PathNotAllowedError) as err:
            folder_sources(root, path)
        messages.add(str(err.value))
    assert len(messages) == 1, messages
