"""Dataset cleaning: unreadable files, exact and near duplicates, label and split leaks.

:func:`clean_dataset` indexes a dataset (:func:`medcls.learning.data.load_dataset`), decodes every
image with :func:`medcls.io.load.load_scan` and reports

- files that cannot be read, with the typed error's message;
- exact duplicates: byte-identical files (SHA-256 of the file);
- near duplicates: different files whose perceptual hashes (a 16x16 difference hash of
  the grayscale display image, 256 bits) differ in at most ``near_threshold`` bits;
- duplicate groups (connected components of the exact + near duplicate graph) whose
  members carry different labels, or sit in different splits (train/val/test).

:func:`grouped_split` writes a train/val/test split that keeps such groups (and an existing
``group`` column) on one side, stratified by label as far as the groups allow.

The command line is ``python -m medcls clean DATA [--out DIR] [--write-split FILE.csv]``.
"""

from __future__ import annotations

import csv
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from medcls.core.errors import DatasetError, MedclsError
from medcls.io.display import display_image, to_uint8
from medcls.learning.data import SPLITS, Dataset, Record, load_dataset

log = logging.getLogger(__name__)


#: Side of the difference hash: 16 gives 16 * 16 = 256 bits.
HASH_SIZE = 16
#: Default near-duplicate threshold, in bits of the 256-bit hash.
DEFAULT_NEAR_THRESHOLD = 6
#: Examples of each finding kept in ``cleaning.json`` (counts are always complete).
JSON_EXAMPLES = 50
#: Members listed per duplicate group in the JSON and Markdown reports.
GROUP_MEMBERS_SHOWN = 20
#: Folds a grouped split is built from: fractions are honoured to 1/20.
SPLIT_FOLDS = 20


@dataclass(frozen=True)
class Member:
    """One image of a duplicate group."""

    ref: str
    label: str
    split: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.ref, "label": self.label, "split": self.split}


@dataclass(frozen=True)
class UnreadableFile:
    """A record whose image could not be decoded."""

    ref: str
    label: str
    error: str  # the typed error's class name, e.g. "UnreadableScanError"
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.ref, "label": self.label, "error": self.error,
                "message": self.message}


@dataclass(frozen=True)
class NearPair:
    """Two different files whose perceptual hashes differ in ``distance`` bits."""

    first: Member
    second: Member
    distance: int

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first.to_dict(), "second": self.second.to_dict(),
                "distance": self.distance}


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies or near copies of each other (two or more members)."""

    members: tuple[Member, ...]
    byte_identical: bool  # every member has the same SHA-256

    @property
    def refs(self) -> list[str]:
        return [m.ref for m in self.members]

    @property
    def labels(self) -> list[str]:
        return sorted({m.label for m in self.members})

    @property
    def splits(self) -> list[str]:
        return sorted({m.split for m in self.members if m.split})

    @property
    def has_conflicting_labels(self) -> bool:
        return len(self.labels) > 1

    @property
    def crosses_splits(self) -> bool:
        return len(self.splits) > 1

    def to_dict(self) -> dict[str, Any]:
        return {"size": len(self.members), "byte_identical": self.byte_identical,
                "labels": self.labels, "splits": self.splits,
                "members": [m.to_dict() for m in self.members[:GROUP_MEMBERS_SHOWN]]}


@dataclass
class CleaningReport:
    """Everything :func:`clean_dataset` found in one dataset."""

    dataset: str
    root: str
    n_records: int
    near_threshold: int
    has_splits: bool
    unreadable: list[UnreadableFile] = field(default_factory=list)
    #: Sets of byte-identical files (two or more each).
    exact_groups: list[DuplicateGroup] = field(default_factory=list)
    #: Pairs of different files within ``near_threshold`` bits (one file per distinct content).
    near_pairs: list[NearPair] = field(default_factory=list)
    #: Connected components of the exact + near duplicate graph (two or more members each).
    groups: list[DuplicateGroup] = field(default_factory=list)

    @property
    def n_readable(self) -> int:
        return self.n_records - len(self.unreadable)

    @property
    def unreadable_refs(self) -> set[str]:
        return {u.ref for u in self.unreadable}

    @property
    def near_groups(self) -> list[DuplicateGroup]:
        """Duplicate groups holding at least two different files (not only exact copies)."""
        return [g for g in self.groups if not g.byte_identical]

    @property
    def conflicting_label_groups(self) -> list[DuplicateGroup]:
        return [g for g in self.groups if g.has_conflicting_labels]

    @property
    def cross_split_groups(self) -> list[DuplicateGroup]:
        return [g for g in self.groups if g.crosses_splits]

    def keep_together(self) -> list[list[str]]:
        """The file refs of each duplicate group, for :func:`grouped_split`."""
        return [g.refs for g in self.groups]

    def counts(self) -> dict[str, int]:
        """Complete counts of every finding."""
        return {
            "records": self.n_records,
            "readable": self.n_readable,
            "unreadable": len(self.unreadable),
            "exact_duplicate_sets": len(self.exact_groups),
            "exact_duplicate_files": sum(len(g.members) for g in self.exact_groups),
            "exact_duplicate_extra_copies": sum(len(g.members) - 1 for g in self.exact_groups),
            "near_duplicate_pairs": len(self.near_pairs),
            "near_duplicate_groups": len(self.near_groups),
            "duplicate_groups": len(self.groups),
            "files_in_duplicate_groups": sum(len(g.members) for g in self.groups),
            "conflicting_label_groups": len(self.conflicting_label_groups),
            "cross_split_groups": len(self.cross_split_groups),
        }

    def to_dict(self, max_examples: int = JSON_EXAMPLES) -> dict[str, Any]:
        """A JSON-able summary: complete counts, the first ``max_examples`` of each finding."""
        return {
            "dataset": self.dataset,
            "root": self.root,
            "hash": {"method": "dhash", "hash_size": HASH_SIZE, "bits": HASH_SIZE * HASH_SIZE,
                     "near_threshold": self.near_threshold},
            "has_splits": self.has_splits,
            "counts": self.counts(),
            "max_examples": max_examples,
            "unreadable": [u.to_dict() for u in self.unreadable[:max_examples]],
            "exact_groups": [g.to_dict() for g in self.exact_groups[:max_examples]],
            "near_pairs": [p.to_dict() for p in self.near_pairs[:max_examples]],
            "conflicting_label_groups": [g.to_dict()
                                         for g in self.conflicting_label_groups[:max_examples]],
            "cross_split_groups": [g.to_dict() for g in self.cross_split_groups[:max_examples]],
        }

    def to_markdown(self, max_examples: int = 10) -> str:
        """A human summary: a table of counts, then the first ``max_examples`` of each finding."""
        c = self.counts()
        bits = HASH_SIZE * HASH_SIZE
        lines = [
            f"# Dataset cleaning: {self.dataset}",
            "",
            f"{c['records']} images indexed from `{self.root}`, {c['readable']} decoded. "
            f"Exact duplicates: same SHA-256 of the file. Near duplicates: {HASH_SIZE}x{HASH_SIZE} "
            f"difference hash of the grayscale display image within {self.near_threshold} of "
            f"{bits} bits. Duplicate groups join both (connected components).",
            "",
            "| finding | count |",
            "|---|---:|",
            f"| unreadable files | {c['unreadable']} |",
            f"| exact-duplicate sets (byte-identical files) | {c['exact_duplicate_sets']} "
            f"({c['exact_duplicate_files']} files) |",
            f"| near-duplicate pairs (different files) | {c['near_duplicate_pairs']} |",
            f"| duplicate groups (exact + near) | {c['duplicate_groups']} "
            f"({c['files_in_duplicate_groups']} files; {c['near_duplicate_groups']} with near "
            "duplicates) |",
            f"| groups with conflicting labels | {c['conflicting_label_groups']} |",
            "| groups crossing train/val/test | "
            + (f"{c['cross_split_groups']} |" if self.has_splits else "n/a (no split column) |"),
        ]

        def section(title: str, items: Sequence[Any], render: Callable[[Any], str]) -> None:
            if not items:
                return
            shown = "" if len(items) <= max_examples else f" (first {max_examples} of {len(items)})"
            lines.extend(["", f"## {title}{shown}", ""])
            lines.extend(f"- {render(item)}" for item in items[:max_examples])

        section("Unreadable files", self.unreadable,
                lambda u: f"`{u.ref}` ({u.label}): {u.error}: {u.message}")
        section("Exact duplicates", self.exact_groups, _group_markdown)
        section("Near duplicates", self.near_pairs,
                lambda p: f"{_member_markdown(p.first)} ~ {_member_markdown(p.second)}: "
                          f"{p.distance} bits")
        section("Groups with conflicting labels", self.conflicting_label_groups, _group_markdown)
        section("Groups crossing splits", self.cross_split_groups, _group_markdown)
        return "\n".join(lines) + "\n"


def _member_markdown(member: Member) -> str:
    where = f"{member.label}, {member.split}" if member.split else member.label
    return f"`{member.ref}` ({where})"


def _group_markdown(group: DuplicateGroup) -> str:
    shown = ", ".join(_member_markdown(m) for m in group.members[:GROUP_MEMBERS_SHOWN])
    hidden = len(group.members) - GROUP_MEMBERS_SHOWN
    return shown + (f" and {hidden} more" if hidden > 0 else "")


class _UnionFind:
    """Disjoint sets over ``0 .. n-1`` (path halving; the smaller index becomes the root)."""

    def __init__(self, n: int) -> None:
        self._parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[int]]:
        """Every set, as sorted indices, ordered by its smallest index."""
        by_root: dict[int, list[int]] = {}
        for i in range(len(self._parent)):
            by_root.setdefault(self.find(i), []).append(i)
        return list(by_root.values())


@dataclass(frozen=True)
class _Hashed:
    """SHA-256 and packed perceptual hash of one readable image, or why it is unreadable."""

    sha256: str | None = None
    phash: np.ndarray | None = None  # HASH_SIZE**2 bits packed into uint8
    error: MedclsError | None = None


def perceptual_hash(image01: np.ndarray) -> np.ndarray:
    """The 16x16 difference hash of a display image in [0, 1], packed into 32 bytes.

    Colour images are averaged to grayscale first, so a grayscale picture stored as RGB
    hashes like its grayscale original.
    """
    import imagehash
    from PIL import Image

    gray = image01 if image01.ndim == 2 else image01.mean(axis=2)
    digest = imagehash.dhash(Image.fromarray(to_uint8(gray)), hash_size=HASH_SIZE)
    return np.packbits(digest.hash.reshape(-1))


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 256) -> list[tuple[int, int, int]]:
    """All pairs ``(i, j, distance)`` with ``i < j`` whose Hamming distance is <= ``threshold``.

    ``hashes`` is ``(n, bytes)`` uint8 of packed bits, ``bytes`` a multiple of 8. The
    comparison is all-against-all, vectorised a block of rows at a time (n = 6000 takes
    about a second).
    """
    n = len(hashes)
    if n < 2:
        return []
    words = np.ascontiguousarray(hashes).view(np.uint64)
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, n, block):
        rows = words[start:start + block]
        dist = np.bitwise_count(rows[:, None, :] ^ words[None, start:, :]).sum(axis=2)
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if j > i:  # columns are offset by `start` like the rows: upper triangle only
                pairs.append((start + i, start + j, int(dist[i, j])))
    return pairs


def _hash_record(dataset: Dataset, record: Record) -> _Hashed:
    try:
        scan = dataset.scan(record)
        return _Hashed(sha256=scan.sha256, phash=perceptual_hash(display_image(scan)))
    except MedclsError as exc:
        return _Hashed(error=exc)


def clean_dataset(root: str | Path | Dataset, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                  workers: int = 2) -> CleaningReport:
    """Find unreadable files, exact and near duplicates, and label or split conflicts.

    ``root`` is a dataset folder (or ``.npz``) as :func:`medcls.learning.data.load_dataset` reads it,
    or an already loaded :class:`~medcls.learning.data.Dataset`. Images are decoded and hashed on
    ``workers`` threads. Raises :class:`~medcls.core.errors.DatasetError` for a missing or invalid
    dataset; unreadable images are findings, not errors.
    """
    if near_threshold < 0:
        raise ValueError("near_threshold must be >= 0")
    dataset = root if isinstance(root, Dataset) else load_dataset(root)
    records = dataset.records
    log.info("cleaning %s: hashing %d images on %d threads", dataset.name, len(records), workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashed = list(pool.map(lambda r: _hash_record(dataset, r), records))

    members = [Member(r.ref, r.label, r.split) for r in records]
    report = CleaningReport(dataset=dataset.name, root=str(dataset.root),
                            n_records=len(records), near_threshold=near_threshold,
                            has_splits=dataset.has_splits)
    readable: list[int] = []
    for i, (record, h) in enumerate(zip(records, hashed)):
        if h.error is not None:
            report.unreadable.append(UnreadableFile(record.ref, record.label,
                                                    type(h.error).__name__, str(h.error)))
        else:
            readable.append(i)

    # Exact duplicates: one representative (the first file) per distinct content.
    by_sha: dict[str, list[int]] = {}
    for i in readable:
        by_sha.setdefault(hashed[i].sha256, []).append(i)
    union = _UnionFind(len(records))
    for same in by_sha.values():
        for i in same[1:]:
            union.union(same[0], i)
        if len(same) > 1:
            report.exact_groups.append(DuplicateGroup(tuple(members[i] for i in same), True))

    # Near duplicates among the distinct contents.
    representatives = [same[0] for same in by_sha.values()]
    if representatives:
        stacked = np.stack([hashed[i].phash for i in representatives])
        for a, b, distance in near_pairs(stacked, near_threshold):
            i, j = representatives[a], representatives[b]
            report.near_pairs.append(NearPair(members[i], members[j], distance))
            union.union(i, j)

    for component in union.components():
        if len(component) > 1:
            identical = len({hashed[i].sha256 for i in component}) == 1
            report.groups.append(DuplicateGroup(tuple(members[i] for i in component), identical))
    log.info("cleaning %s: %s", dataset.name, report.counts())
    return report


def existing_group(record: Record) -> str | None:
    """The record's own ``group`` column (the default grouping of :func:`grouped_split`)."""
    return record.group


def grouped_split(data: Dataset | Sequence[Record],
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
                  group_key: Callable[[Record], str | None] = existing_group,
                  keep_together: Iterable[Iterable[str]] = ()) -> list[Record]:
    """A train/val/test split in which no group crosses splits, stratified by label.

    Records sharing a ``group_key`` value (default: the ``group`` column; ``None`` means no
    group) and the file refs of each set in ``keep_together`` (e.g.
    :meth:`CleaningReport.keep_together`; refs not among the records are ignored) end up in
    one group, and each group in one split. Groups are dealt into 20 folds (fewer for small
    data) by scikit-learn's ``StratifiedGroupKFold``, which keeps label proportions as far as
    the groups allow, and the folds are shared out by ``fractions``.

    Returns new records with ``split`` set and ``group`` set to the merged group id.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    records = list(data.records if isinstance(data, Dataset) else data)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError("fractions must be three non-negative numbers (train, val, test) "
                         "summing to 1")
    if fractions[0] == 0:
        raise ValueError("the train fraction must be positive")

    union = _UnionFind(len(records))
    first_with_key: dict[str, int] = {}
    index_of_ref: dict[str, int] = {}
    for i, record in enumerate(records):
        key = group_key(record)
        if key is not None:
            union.union(first_with_key.setdefault(key, i), i)
        index_of_ref.setdefault(record.ref, i)
    for refs in keep_together:
        indices = [index_of_ref[ref] for ref in refs if ref in index_of_ref]
        for i in indices[1:]:
            union.union(indices[0], i)
    components = union.components()
    group_ids = np.empty(len(records), dtype=np.int64)
    for gid, component in enumerate(components):
        group_ids[component] = gid

    wanted = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0]
    if len(components) < len(wanted):
        raise DatasetError(f"{len(records)} images form only {len(components)} independent "
                           f"group(s): too few for a {'/'.join(wanted)} split.")
    labels = np.array([r.label for r in records])
    # scikit-learn needs a class with at least one member per fold.
    largest_class = int(np.unique(labels, return_counts=True)[1].max())
    n_folds = min(SPLIT_FOLDS, len(components), largest_class)
    if n_folds < len(wanted):
        raise DatasetError(f"{len(records)} images are too few for a {'/'.join(wanted)} split.")
    fold_split = _share_folds(n_folds, fractions)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    split_of = np.empty(len(records), dtype=object)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = splitter.split(np.zeros(len(records)), labels, group_ids)
        for fold, (_, fold_indices) in enumerate(folds):
            split_of[fold_indices] = fold_split[fold]
    return [replace(r, split=str(split_of[i]), group=f"g{group_ids[i]}")
            for i, r in enumerate(records)]


def _share_folds(n_folds: int, fractions: Sequence[float]) -> list[str]:
    """The split of each fold: ``fractions`` of ``n_folds`` by largest remainder, at least
    one fold for every split with a positive fraction."""
    exact = [f * n_folds for f in fractions]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda k: exact[k] - counts[k], reverse=True):
        if sum(counts) == n_folds:
            break
        counts[i] += 1
    for i, fraction in enumerate(fractions):
        while fraction > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda k: counts[k])
            counts[donor] -= 1
            counts[i] += 1
    return [name for name, count in zip(SPLITS, counts) for _ in range(count)]


def write_split_csv(records: Iterable[Record], path: str | Path) -> Path:
    """Write a labels table with the columns ``file,label,split,group``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "split", "group"])
        for r in records:
            writer.writerow([r.ref, r.label, r.split or "", r.group or ""])
    return path
