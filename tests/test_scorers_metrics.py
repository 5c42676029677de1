import warnings

import numpy as np
import pytest
from sklearn.base import clone

from diffpath.scoring.metrics import aupr, auroc, detection_metrics, fpr_at_tpr
from diffpath.scoring.scorers import GMMScorer, KDEScorer, make_scorer


def test_auroc_in_distribution_is_positive():
    s_in, s_out = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert auroc(s_in, s_out) == 1.0
    assert auroc(s_out, s_in) == 0.0  # never flipped
    assert aupr(s_in, s_out) == 1.0


def test_fpr_at_95_tpr_by_hand():
    s_in = np.arange(100, dtype=float)  # keep the top 95 in-distribution scores: threshold 5
    s_out = np.array([4.0, 5.0, 6.0, 100.0])
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(3 / 4)
    assert detection_metrics(s_in, s_out)["fpr95"] == pytest.approx(0.75)


def test_metrics_refuse_nan_and_empty():
    with pytest.raises(ValueError):
        auroc([1.0, np.nan], [0.0])
    with pytest.raises(ValueError):
        auroc([], [0.0])


def test_gmm_scorer_separates_and_is_sklearn_estimator():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 6))
    test_in, test_out = rng.normal(size=(200, 6)), rng.normal(3.0, 1.0, size=(200, 6))
    sc = GMMScorer(n_components=(1, 2), covariance_type=("full", "diag"), cv=3).fit(train)
    assert set(sc.best_params_) == {"n_components", "covariance_type"}
    assert auroc(sc.score_samples(test_in), sc.score_samples(test_out)) > 0.99
    assert clone(sc).get_params()["cv"] == 3


def test_gmm_grid_shrinks_with_warning_for_small_training_sets():
    X = np.random.default_rng(1).normal(size=(60, 6))
    sc = GMMScorer(cv=10)  # DiffPath's default grid: 50 and 100 components
    grid, cv = sc.effective_grid(600)
    assert grid["GMM__n_components"] == [50] and cv == 10  # folds train on 540: at most 54 components
    grid, cv = sc.effective_grid(1200)
    assert grid["GMM__n_components"] == [50, 100]
    grid, cv = sc.effective_grid(60)
    assert grid["GMM__n_components"] == [5] and cv == 10  # 54 per fold → 5 components
    with pytest.warns(UserWarning, match="too small for the GMM grid"):
        GMMScorer(n_components=(50, 100), covariance_type=("diag",), cv=5, max_iter=20).fit(X[:40])


def test_gmm_default_grid_no_warning_on_large_set():
    X = np.random.default_rng(2).normal(size=(2400, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        GMMScorer(covariance_type=("spherical",), cv=2, max_iter=5).fit(X)


def test_kde_scorer_is_diffpaths_kde():
    from sklearn.neighbors import KernelDensity

    x = np.random.default_rng(3).normal(100, 10, size=300)
    ours = KDEScorer().fit(x).score_samples(np.array([90.0, 100.0, 200.0]))
    ref = KernelDensity(kernel="gaussian", bandwidth=5).fit(x[:, None]).score_samples(np.array([[90.0], [100.0], [200.0]]))
    np.testing.assert_allclose(ours, ref)


def test_scorers_reject_bad_features():
    with pytest.raises(ValueError, match="NaN"):
        KDEScorer().fit(np.array([1.0, np.nan]))
    sc = KDEScorer().fit(np.ones((5, 2)))
    with pytest.raises(ValueError, match="expected 2 features"):
        sc.score_samples(np.ones((3, 3)))
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("svm")
