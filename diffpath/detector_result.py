"""The scores of a batch of images (:class:`ScoreResult`) and the CSV ``diffpath score`` writes."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ScoreResult", "csv_path"]


def csv_path(path: str) -> str:
    """``path`` as written to a CSV: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class ScoreResult:
    """Scores of a batch of N images.

    Attributes:
        paths: the images that were scored, in input order.
        scores: (N,) log-density (higher = more normal).
        percentiles: (N,) percentage of the calibration (held-out normal) images scoring strictly lower.
        is_ood: (N,) bool, ``scores < threshold``.
        threshold: the threshold used; accept: the fraction of normals it accepts (at least).
        skipped: (file, reason) of the files that could not be read.
    """

    paths: list[str]
    scores: np.ndarray
    percentiles: np.ndarray
    is_ood: np.ndarray
    threshold: float
    accept: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_csv(self) -> str:
        """``path,score,percentile,is_ood`` (floats in shortest round-trip form; true/false). File
        names that are not UTF-8 are written with ``\\xNN`` escapes (:func:`csv_path`)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "percentile", "is_ood"])
        for p, s, q, o in zip(self.paths, self.scores, self.percentiles, self.is_ood):
            w.writerow([csv_path(p), repr(float(s)), repr(float(q)), "true" if o else "false"])
        return buf.getvalue()
