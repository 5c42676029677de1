"""diffpath.scoring.persist: fitted scorers saved as numbers (no pickle) score exactly as before."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from diffpath.scoring.persist import ScorerFormatError, load_scorer, save_scorer
from diffpath.scoring.scorers import GMMScorer, KDEScorer


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_gmm_round_trip(tmp_path, cov):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(40, 3)), rng.normal(3, 0.5, size=(40, 3))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = GMMScorer(n_components=(2,), covariance_type=(cov,), cv=3).fit(X)
    desc = save_scorer(s, tmp_path / "s.npz")
    desc = json.loads(json.dumps(desc))  # it is plain JSON
    r = load_scorer(tmp_path / "s.npz", desc)
    Y = rng.normal(1, 2, size=(9, 3))
    np.testing.assert_allclose(r.score_samples(Y), s.score_samples(Y), rtol=1e-12, atol=1e-12)
    assert r.best_params_["covariance_type"] == cov


@pytest.mark.parametrize("standardize", [False, True])
def test_kde_round_trip(tmp_path, standardize):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 1)) * 10
    s = KDEScorer(bandwidth="scott" if standardize else 5.0, standardize=standardize).fit(X)
    r = load_scorer(tmp_path / "k.npz", save_scorer(s, tmp_path / "k.npz"))
    Y = rng.normal(size=(5, 1)) * 10
    np.testing.assert_allclose(r.score_samples(Y), s.score_samples(Y), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        r.score_samples(np.zeros((2, 3)))


def test_malformed_files_are_refused(tmp_path):
    X = np.random.default_rng(2).normal(size=(30, 2))
    s = KDEScorer().fit(X)
    desc = save_scorer(s, tmp_path / "k.npz")
    np.savez(tmp_path / "obj.npz", **{"kde.data": np.array([object()] * 2, dtype=object)})
    with pytest.raises(ScorerFormatError, match="has dtype object"):
        load_scorer(tmp_path / "obj.npz", desc)  # object arrays would need pickle: refused unread
    np.savez(tmp_path / "bad.npz", **{"kde.data": np.zeros((4, 3))})
    with pytest.raises(ScorerFormatError, match=r"\(N, 2\)"):
        load_scorer(tmp_path / "bad.npz", desc)
    with pytest.raises(ScorerFormatError, match="bandwidth must be"):
        load_scorer(tmp_path / "k.npz", {**desc, "estimator": {"bandwidth": -1.0}})
    with pytest.raises(ScorerFormatError, match="must be float"):
        load_scorer(tmp_path / "k.npz", {**desc, "estimator": {"bandwidth": "__import__('os')"}})
