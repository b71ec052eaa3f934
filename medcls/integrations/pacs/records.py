"""What a PACS review produced, as plain records: the answering model's identity, the series
answered (with their instances' headers) and the objects skipped with why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medcls.engine.series import WITHHELD, SeriesAnswer, SeriesVerdict
from medcls.integrations.pacs.client import SeriesInfo, handle


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, predictor) -> "ModelIdentity":
        card = predictor.card
        return cls(card.name, str(card.version), card.model_sha256)

    @property
    def tag(self) -> str:
        """The mark of this model version's results (in the SR's series description)."""
        return f"sha256-{self.sha256[:16]}"

    @property
    def results_description(self) -> str:
        """The SR's series description, matched exactly by QIDO-RS to find earlier results.
        Only characters a query string carries unescaped (letters, digits, ``.-_``): Orthanc
        1.10 compares percent-escaped values as they come (see :func:`_matches`)."""
        safe = lambda text: re.sub(r"[^A-Za-z0-9.-]+", "-", text)  # noqa: E731
        return f"MedCLS_{safe(self.name)[:24]}_{safe(self.version)[:8]}_{self.tag}"[:64]


@dataclass(frozen=True)
class Skipped:
    """A retrieved object that was not classified, and why (no UIDs: shown to anyone)."""

    series_number: int | None
    sop_class: str
    reason: str


@dataclass
class SeriesReview:
    """One image series (or, when its slices face several ways, one orientation of it) answered
    by the series view's engine (:func:`medcls.engine.series.answer_series`: every slice in
    batches, the aggregation rule, the suspicious run) and coded by
    :func:`medcls.engine.series.series_verdict`."""

    series: SeriesInfo
    answer: SeriesAnswer | None  # medcls.engine.series.SeriesAnswer
    headers: list = field(default_factory=list, repr=False)  # the image instances' headers (no pixels), as retrieved
    skipped: list[Skipped] = field(default_factory=list)
    explanation: object | None = field(default=None, repr=False)  # the shown slice's Explanation
    scan: object | None = field(default=None, repr=False)  # the shown slice's Scan
    roi: object | None = None  # dicom_results.Roi: a tumour answer's region, else None
    verdict: SeriesVerdict | None = None
    slice_instances: list[tuple[int, int]] = field(default_factory=list, repr=False)  # per slice: (header index, frame)

    @property
    def driving(self) -> int | None:
        """The slice (0-based, series order) that shows the answer; None when withheld."""
        return self.verdict.slice if self.verdict is not None else None

    @property
    def state(self) -> str:
        return self.verdict.state if self.verdict is not None else WITHHELD

    @property
    def prediction(self):
        """The shown slice's own prediction (None when the answer is withheld)."""
        if self.answer is None or self.driving is None:
            return None
        return self.answer.slices[self.driving].prediction

    def slice_header(self, i: int):
        """Header of the instance that holds slice ``i``."""
        return self.headers[self.slice_instances[i][0]]

    def slice_frame(self, i: int) -> int:
        """0-based frame of slice ``i`` in its instance (0 for single-frame images)."""
        return self.slice_instances[i][1]

    @property
    def driving_header(self):
        return None if self.driving is None else self.slice_header(self.driving)

    @property
    def driving_frame(self) -> int | None:
        return None if self.driving is None else self.slice_frame(self.driving)

    @property
    def answered_instances(self) -> list[tuple[int, object]]:
        """(slice, header) of every slice the model answered (its gate verdict included)."""
        if self.answer is None:
            return []
        return [(s.index, self.slice_header(s.index)) for s in self.answer.slices
                if s.prediction is not None]


@dataclass
class StudyReview:
    study_uid: str
    model: ModelIdentity
    series: list[SeriesReview]
    prior_results: list[SeriesInfo] = field(default_factory=list)  # this model's SR already there
    answer_ids: dict[str, int] = field(default_factory=dict, repr=False)  # audit: SOP UID -> id

    @property
    def answered(self) -> list[SeriesReview]:
        return [s for s in self.series if s.answer is not None and s.answer.slices
                and s.verdict is not None]

    @property
    def skipped(self) -> list[Skipped]:
        return [k for s in self.series for k in s.skipped]

    @property
    def already_sent(self) -> bool:
        return bool(self.prior_results)

    def __repr__(self) -> str:
        return f"StudyReview({handle(self.study_uid)}, {len(self.series)} series)"
