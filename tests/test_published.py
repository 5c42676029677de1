"""The published figures: the data file's layout, and the tables that put them beside ours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffpath.data import dataset_info
from diffpath.data.registry import available_datasets
from diffpath.methods.registry import METHODS
from diffpath.study.published import (ALL, COLUMNS, PUBLISHED, TOLERANCE, beside, beside_markdown, comparison_markdown,
                                      load_published, model_comparison)

PAPER_SETS = {"cifar10", "cifar100", "svhn", "celeba", "textures_dtd"}


def test_published_file_layout():
    raw = pd.read_csv(PUBLISHED, dtype=str, keep_default_na=False)
    assert tuple(raw.columns) == COLUMNS
    t = load_published()
    assert len(t) >= 20 and t["auroc"].between(0.0, 1.0).all()
    assert all(len(a.split(".")[-1]) == 3 for a in raw["auroc"])  # as printed: three decimals
    assert set(t["method"]) <= set(METHODS) and set(t["base_model"]) <= {"celeba", "imagenet"}
    assert PAPER_SETS <= set(available_datasets()) and all(not dataset_info(d).offline for d in PAPER_SETS)
    for _, r in t.iterrows():
        assert {r["in_dist"], r["ood"]} <= PAPER_SETS | {ALL}, r.to_dict()
        assert (r["in_dist"] == ALL) == (r["ood"] == ALL) and (r["in_dist"] == ALL or r["in_dist"] != r["ood"])
        assert "arXiv" in r["source"] and ("table" in r["source"].lower()), r["source"]  # paper and table named
        assert r["verified"] in ("yes", "no") and (r["verified"] == "yes" or r["note"]), r.to_dict()
    key = ["method", "base_model", "in_dist", "ood", "source"]
    assert not t.duplicated(key).any()
    # the figures the study is measured against
    get = t.set_index(key[:4])["auroc"]
    assert get["diffpath", "celeba", "cifar10", "svhn"] == 0.910 and get["diffpath", "imagenet", ALL, ALL] == 0.850
    assert get["diffpath", "celeba", ALL, ALL] == 0.931


def _results(rows):
    return pd.DataFrame(rows, columns=["method", "in_dist", "ood", "auroc", "fpr95", "aupr"])


def test_beside_gives_delta_and_marks_pairs_outside_the_tolerance():
    pub = load_published()
    res = _results([("diffpath", "cifar10", "svhn", 0.915, 0.1, 0.9), ("diffpath", "svhn", "cifar10", 0.80, 0.1, 0.9),
                    ("diffpath_1d", "cifar10", "svhn", 0.5, 0.1, 0.9)])
    t = beside(res, pub, "celeba").set_index(["method", "in_dist", "ood"])
    assert set(t.index.get_level_values(0)) == {"diffpath"}  # methods the run has; diffpath_1d has no figure
    r = t.loc["diffpath", "cifar10", "svhn"]
    assert r["delta"] == pytest.approx(0.915 - 0.910) and not r["outside"]
    r = t.loc["diffpath", "svhn", "cifar10"]
    assert r["delta"] == pytest.approx(0.80 - 0.939) and r["outside"]
    r = t.loc["diffpath", ALL, ALL]
    assert r["ours"] == pytest.approx((0.915 + 0.80) / 2) and r["published"] == 0.931
    assert np.isnan(t.loc["diffpath", "celeba", "svhn"]["ours"]) and not t.loc["diffpath", "celeba", "svhn"]["outside"]
    md = beside_markdown(beside(res, pub, "celeba"))
    assert "| DiffPath-6D | svhn | cifar10 | 0.800 | 0.939 | -0.139 ✗ | [1] (unverified) |" in md
    assert f"|Δ| > {TOLERANCE:g}" in md and "[1] DiffPath (Heng et al., NeurIPS 2024" in md
    assert beside(res, pub, "imagenet")["in_dist"].tolist() == [ALL]  # only the ImageNet average is published


def test_model_comparison_puts_each_models_mean_beside_its_published_average():
    pub = load_published()
    a = _results([("diffpath", "cifar10", "svhn", 0.9, 0, 0), ("diffpath", "svhn", "cifar10", 0.96, 0, 0)])
    b = _results([("diffpath", "cifar10", "svhn", 0.8, 0, 0), ("diffpath", "svhn", "cifar10", 0.86, 0, 0)])
    t = model_comparison({"diffpath-celeba32": a, "imagenet64": b},
                         {"diffpath-celeba32": "celeba", "imagenet64": "imagenet"}, pub, methods=("diffpath",))
    assert t[["model", "published"]].values.tolist() == [["diffpath-celeba32", 0.931], ["imagenet64", 0.850]]
    assert t["ours"].tolist() == pytest.approx([0.93, 0.83]) and t["delta"].tolist() == pytest.approx([-0.001, -0.02])
    md = comparison_markdown(t)
    assert "| DiffPath-6D | imagenet64 | imagenet | 2 | 0.830 | 0.850 | -0.020 | [2] |" in md
