"""Where scans come from: a named source whose ``read()`` gives bytes or a path (uploads, a
server folder confined to its root, a list file, a zip archive within its limits), for the
single-scan review and for gathering series alike.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Protocol

from medcls.core.errors import ArchiveRejectedError, PathNotAllowedError
from medcls.io.scan import MAX_FILE_BYTES

SKIP_NAMES = {"DICOMDIR", "labels.csv", "Thumbs.db", ".DS_Store"}
ZIP_MAX_MEMBERS = 20_000
ZIP_MAX_TOTAL_BYTES = 2 << 30  # declared uncompressed size of all members
ZIP_MAX_RATIO = 200  # uncompressed / compressed size, of one member and of the whole archive
ZIP_RATIO_FLOOR = 1 << 20  # below this many declared bytes a high ratio is harmless
ZIP_MAX_MEMBER_BYTES = MAX_FILE_BYTES  # declared size of one member: the limit of a file on disk
MAX_FOLDER_DEPTH = 64  # levels of subfolders a folder review walks (DICOM exports nest 3-6)

#: One sentence for a path that does not exist, lies outside the scan folder or is no folder:
#: telling them apart would tell a visitor which server paths exist.
NOT_A_SCAN_FOLDER = ("That path is not a folder inside the allowed scan folder (it may be outside "
                     "it, or not exist); only folders inside it can be reviewed.")


class SourceLike(Protocol):
    name: str

    def read(self) -> Any: ...


@dataclass(frozen=True)
class _Bytes:
    name: str
    data: bytes = field(repr=False)

    def read(self) -> bytes:
        return self.data


def bytes_source(name: str, data: bytes) -> SourceLike:
    """A source from a name and bytes (an upload held in memory)."""
    return _Bytes(name, data if isinstance(data, bytes) else bytes(data))


@dataclass(frozen=True)
class Source:
    """One input of a review: a display name and how to get its bytes."""

    name: str
    read: Callable[[], bytes | str | os.PathLike] = field(repr=False)


def resolve_inside(root: str | Path, user_path: str | Path) -> Path:
    """``user_path`` (relative to ``root``, or absolute) resolved with symlinks; refused with
    :class:`PathNotAllowedError` unless it lies inside ``root``."""
    root_r = Path(root).resolve()
    raw = Path(user_path)
    candidate = raw if raw.is_absolute() else root_r / raw
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError, ValueError):  # ValueError: a NUL byte
        raise PathNotAllowedError(NOT_A_SCAN_FOLDER) from None
    if resolved != root_r and root_r not in resolved.parents:
        raise PathNotAllowedError(NOT_A_SCAN_FOLDER)
    return resolved


def _walk(base: Path):
    """``(folder, sorted subfolder names, sorted file names)`` top-down, hidden entries left
    out, without recursion (Python 3.11's ``os.walk`` recurses and a folder 1,500 levels deep
    raised RecursionError) and refused past :data:`MAX_FOLDER_DEPTH` levels."""
    todo = [(base, 0)]
    while todo:
        folder, depth = todo.pop()
        dirs, files = [], []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                        link = entry.is_symlink()
                    except OSError:
                        is_dir = link = False
                    if not is_dir:
                        files.append(entry.name)
                    elif not link:  # a link to a folder is not followed (os.walk's default)
                        dirs.append(entry.name)
        except OSError:
            continue  # an unreadable subfolder gives no rows, as os.walk skipped it
        dirs.sort()
        if dirs and depth >= MAX_FOLDER_DEPTH:
            raise PathNotAllowedError(
                f"That folder nests subfolders more than {MAX_FOLDER_DEPTH} levels deep; review "
                "a folder further down, or flatten it.")
        yield folder, dirs, sorted(files)
        todo.extend((folder / d, depth + 1) for d in reversed(dirs))


def folder_sources(root: str | Path, folder: str | Path = ".") -> list[Source]:
    """Files under ``folder`` (inside ``root``), sorted, recursing into subfolders (DICOM series
    folders give one row per file). Symlinks that point outside ``root`` are refused."""
    root_r = Path(root).resolve()
    base = resolve_inside(root_r, folder)
    if not base.is_dir():
        raise PathNotAllowedError(NOT_A_SCAN_FOLDER)
    out: list[Source] = []
    for dirpath, _dirnames, filenames in _walk(base):
        for fn in filenames:
            if fn in SKIP_NAMES:
                continue
            path = dirpath / fn
            rel = str(path.relative_to(base))
            try:
                real = resolve_inside(root_r, path)
            except PathNotAllowedError as exc:
                out.append(Source(rel, _raiser(exc)))
                continue
            out.append(Source(rel, lambda p=real: p))
    return out


def list_sources(list_file: str | Path) -> list[Source]:
    """The files named in a text file, one path a line (blank lines and ``#`` comments skipped;
    relative paths are relative to the list file's folder). A missing file becomes a row with
    its reason, as an unreadable one does."""
    list_file = Path(list_file)
    base = list_file.resolve().parent
    out: list[Source] = []
    for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
        name = line.strip()
        if name and not name.startswith("#"):
            out.append(Source(name, lambda p=base / name: p))
    return out


def cli_sources(source: str | Path) -> list[Source]:
    """``medcls review SOURCE``: a folder tree, or a list file of paths."""
    path = Path(source)
    if path.is_file():
        return list_sources(path)
    return folder_sources(path.resolve(), ".")


def _raiser(exc: Exception):
    def read():
        raise exc
    return read


def upload_sources(files: Iterable) -> list[Source]:
    """Uploaded files (objects with ``name`` and ``getvalue()``); a ``.zip`` is expanded in memory."""
    out: list[Source] = []
    for f in files:
        data = f.getvalue()
        if f.name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
            out.extend(zip_sources(data, prefix=f"{f.name}/"))
        else:
            out.append(Source(f.name, lambda d=data: d))
    return out


def zip_sources(data: bytes, prefix: str = "", max_members: int = ZIP_MAX_MEMBERS,
                max_total: int = ZIP_MAX_TOTAL_BYTES, max_ratio: int = ZIP_MAX_RATIO,
                max_member: int = ZIP_MAX_MEMBER_BYTES) -> list[Source]:
    """The members of a zip archive, checked before anything is expanded."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ArchiveRejectedError("The .zip file is damaged and cannot be opened.") from None
    if len(infos) > max_members:
        raise ArchiveRejectedError(f"The .zip holds {len(infos)} files; at most {max_members} are "
                                   "accepted.")
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise ArchiveRejectedError("The .zip contains a file name that points outside the "
                                       "archive (absolute or '..'); it was refused.")
        if info.file_size > max_member:
            raise ArchiveRejectedError(f"A file in the .zip expands to {info.file_size / 2**20:.0f} MB, "
                                       f"more than the {max_member / 2**20:.0f} MB accepted for one "
                                       "file; it was refused.")
    # Whole-archive bounds: many members each just under a per-member rule (3,000 x 1 MiB of
    # zeros) add up to a bomb, so the declared total and the ratio are checked over all members.
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_total:
        raise ArchiveRejectedError(f"The .zip expands to {total / 2**30:.1f} GB, more than the "
                                   f"{max_total / 2**30:.0f} GB accepted; it was refused.")
    worst = max(infos, key=lambda i: i.file_size / max(i.compress_size, 1), default=None)
    if ((total > ZIP_RATIO_FLOOR and total > max_ratio * max(packed, 1))
            or (worst is not None and worst.file_size > ZIP_RATIO_FLOOR
                and worst.file_size > max_ratio * max(worst.compress_size, 1))):
        raise ArchiveRejectedError(f"The .zip looks like a zip bomb (it expands more than "
                                   f"{max_ratio}x); it was refused without being expanded.")

    def reader(info: zipfile.ZipInfo):
        def read() -> bytes:
            with zf.open(info) as fh:
                content = fh.read(info.file_size + 1)
            if len(content) > info.file_size:
                raise ArchiveRejectedError("A .zip member is larger than it declares.")
            return content
        return read

    return [Source(prefix + i.filename, reader(i)) for i in infos
            if not PurePosixPath(i.filename).name.startswith(".")
            and "__MACOSX" not in i.filename and PurePosixPath(i.filename).name not in SKIP_NAMES]
