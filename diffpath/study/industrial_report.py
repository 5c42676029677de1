"""The localisation paper profile's tables: DIVAD's rows per category, and beside its published figures.

Numbers are × 100 with one decimal, as the MVTec AD / VisA literature prints them. Tables (written by
notebook 83 under the profile's ``reports/tables/industrial/``):

* ``<benchmark>.md``: every configuration (round-trip row × map) as a row: UNet and VAE
  evaluations per image and the category means of image AUROC, pixel AUROC, PRO (exact; and the
  200-threshold reference), pixel AP;
* ``<benchmark>_<row>_<map>.md``: one configuration, rows = categories plus ``mean``, columns = the
  four metrics (image AUROC, pixel AUROC, PRO, pixel AP);
* ``published.md``: DIVAD's published figures (``reports/published/localization.csv``, with their
  source) beside the measured ones of the row the paper reports (DIVAD's code, DINO map):
  measured as is, measured with AUROC flipped below 0.5 as DIVAD's evaluation does, and the
  difference (flipped − published).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["TABLE_METRICS", "METRIC_LABELS", "with_means", "category_table", "configuration_table",
           "read_published", "published_comparison"]

#: the four metrics of the per-category tables, as the papers report them
TABLE_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")
METRIC_LABELS: dict[str, str] = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO",
                                 "pro_200": "PRO (200 thresholds)", "pixel_ap": "pixel AP"}
_VALUE_COLUMNS = ("image_auroc", "pixel_auroc", "pro", "pro_200", "pixel_ap", "image_auroc_flipped",
                  "pixel_auroc_flipped")


def with_means(per_category: pd.DataFrame) -> pd.DataFrame:
    """Per (row, map): its category rows, then one with ``category = "mean"``: the unweighted mean
    over the categories where a metric is defined (NaN skipped), the image counts summed."""
    out = []
    for _, g in per_category.groupby(["row", "map"], sort=False):
        mean = g.iloc[[0]].copy()
        mean["category"] = "mean"
        for c in _VALUE_COLUMNS:
            mean[c] = g[c].astype(float).mean()  # pandas skips NaN
        mean[["n", "n_anomalous"]] = [int(g["n"].sum()), int(g["n_anomalous"].sum())]
        out += [g, mean]
    return pd.concat(out, ignore_index=True)


def category_table(df: pd.DataFrame, row: str, amap: str) -> pd.DataFrame:
    """Rows = categories plus ``mean``; columns = :data:`TABLE_METRICS` × 100."""
    g = df[(df["row"] == row) & (df["map"] == amap)].set_index("category")
    t = g[list(TABLE_METRICS)].astype(float) * 100.0
    t.columns = [METRIC_LABELS[c] for c in TABLE_METRICS]
    t.index.name = "category"
    return t


def configuration_table(df: pd.DataFrame, rows: Sequence[str], maps: Sequence[str]) -> pd.DataFrame:
    """Rows = configurations ``<row> / <map>``; columns: evaluations per image and the means × 100."""
    mean = df[df["category"] == "mean"].set_index(["row", "map"])
    out = {}
    for r in rows:
        for m in maps:
            if (r, m) not in mean.index:
                continue
            rec = mean.loc[(r, m)]
            out[f"{r} / {m}"] = {"UNet evals": float(rec["unet_evals"]), "VAE evals": float(rec["vae_evals"]),
                                 **{METRIC_LABELS[k]: 100.0 * float(rec[k]) for k in
                                    ("image_auroc", "pixel_auroc", "pro", "pro_200", "pixel_ap")}}
    t = pd.DataFrame.from_dict(out, orient="index")
    t.index.name = "configuration"
    return t


def read_published(path: str | Path) -> pd.DataFrame:
    """DIVAD's published figures: columns ``paper, benchmark, metric, value, source`` (value × 100)."""
    pub = pd.read_csv(path, comment="#")
    missing = {"paper", "benchmark", "metric", "value", "source"} - set(pub.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return pub


def published_comparison(df_by_benchmark: dict[str, pd.DataFrame], published: pd.DataFrame, *,
                         row: str = "divad_code", amap: str = "dino", paper: str = "DIVAD") -> pd.DataFrame:
    """One line per (benchmark, metric) that the paper reports: published, measured, measured with
    AUROC flipped as DIVAD's evaluation does, and flipped − published (all × 100). The paper's
    PRO is compared with the 200-threshold reference PRO (its code's)."""
    pub = published[published["paper"] == paper]
    lines = []
    for _, p in pub.iterrows():
        df = df_by_benchmark.get(str(p["benchmark"]))
        if df is None:
            continue
        mean = df[(df["row"] == row) & (df["map"] == amap) & (df["category"] == "mean")]
        if mean.empty or p["metric"] not in (*TABLE_METRICS, "pro_200"):
            continue
        key = "pro_200" if p["metric"] == "pro" else str(p["metric"])
        measured = 100.0 * float(mean[key].iloc[0])
        flip_key = f"{key}_flipped"
        as_divad = 100.0 * float(mean[flip_key].iloc[0]) if flip_key in mean else measured
        lines.append({"benchmark": p["benchmark"], "metric": METRIC_LABELS[str(p["metric"])],
                      "published": float(p["value"]), "measured": measured, "measured, flipped": as_divad,
                      "difference": as_divad - float(p["value"]) if np.isfinite(as_divad) else np.nan,
                      "configuration": f"{row} / {amap}", "source": p["source"]})
    return pd.DataFrame(lines)
