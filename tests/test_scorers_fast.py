"""The scorers' fast path (torch) against scikit-learn, the reference implementation.

Tolerances: both paths run the same float64 EM from the same k-means labels; they differ only in
summation order and in how the log-densities are expanded (see diffpath/scoring/gmm.py), a few
units of 1e-16 relative per operation. Over tens of EM iterations (a contraction near the fixed
point) that stays ~1e-12 on log-likelihoods of order 1–10; we allow 1e-8, far below any difference
between grid points (≥ 1e-3 here) and far above rounding, so a wrong formula (a missing term, a
wrong fold, a different initialisation) fails.
"""


import numpy as np
import pytest
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

from diffpath.scoring.gmm import BatchedEM, kmeans_labels, run_tasks
from diffpath.scoring.gmm_search import fast_grid_search
from diffpath.scoring.kde import gaussian_kde_log_density
from diffpath.scoring.metrics import auroc
from diffpath.scoring.scorers import GMMScorer, KDEScorer

ATOL = 1e-8


def _features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Skewed, correlated 4-D features from a few clusters (N, 4)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 3, size=(5, 4))
    mix = np.random.default_rng(98).normal(size=(5, 4, 4)) * 0.6
    z = rng.integers(0, 5, n)
    X = centres[z] + np.einsum("nd,nde->ne", rng.normal(size=(n, 4)), mix[z]) + shift
    X[:, 0] = np.exp(X[:, 0] / 4)
    return X


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_batched_em_is_sklearns_em(cov):
    X = StandardScaler().fit_transform(_features(600, 0))
    (lab,) = kmeans_labels([X], 6, random_state=0)
    res = BatchedEM(cov, max_iter=200).fit(X[None], np.ones((1, len(X))), lab[None], 6)
    gm = GaussianMixture(6, covariance_type=cov, max_iter=200, random_state=0).fit(X)
    assert res.n_iter[0] == gm.n_iter_ and bool(res.converged[0]) == gm.converged_
    np.testing.assert_allclose(res.means[0], gm.means_, atol=ATOL)
    np.testing.assert_allclose(res.weights[0], gm.weights_, atol=ATOL)
    np.testing.assert_allclose(res.covariances[0], gm.covariances_, atol=ATOL)
    assert abs(res.lower_bound[0] - gm.lower_bound_) < ATOL


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_fold_at_a_time_em_is_sklearns_em(cov):
    """The CPU path (one problem, training rows only, small row chunks) against scikit-learn."""
    X = StandardScaler().fit_transform(_features(600, 0))
    (lab,) = kmeans_labels([X[:500]], 6, random_state=0)
    res = BatchedEM(cov, max_iter=200).fit_rows(X[:500], lab, 6, X_test=X[500:], rows=70)
    gm = GaussianMixture(6, covariance_type=cov, max_iter=200, random_state=0).fit(X[:500])
    assert res.n_iter[0] == gm.n_iter_ and bool(res.converged[0]) == gm.converged_
    np.testing.assert_allclose(res.means[0], gm.means_, atol=ATOL)
    np.testing.assert_allclose(res.covariances[0], gm.covariances_, atol=ATOL)
    assert abs(res.lower_bound[0] - gm.lower_bound_) < ATOL
    assert abs(res.heldout[0] - gm.score(X[500:])) < ATOL


def test_threads_give_the_serial_result_bit_for_bit():
    """n_jobs threads share the (grid point, fold) problems; each is computed alone with one BLAS
    thread, so the scores are identical, not merely close."""
    from sklearn.model_selection import KFold

    X = _features(700, 8)
    splits = list(KFold(3, shuffle=True, random_state=0).split(X))
    args = (X, (3, 5), ("full", "tied", "diag", "spherical"), splits)
    one = fast_grid_search(*args, max_iter=60, device="cpu", n_jobs=1)
    two = fast_grid_search(*args, max_iter=60, device="cpu", n_jobs=2)
    np.testing.assert_array_equal(one["split_scores"], two["split_scores"])
    np.testing.assert_array_equal(one["n_iter"], two["n_iter"])
    assert one["best_params"] == two["best_params"]
    assert run_tasks([lambda i=i: i * i for i in range(7)], n_jobs=3) == [i * i for i in range(7)]


def test_grid_search_chooses_sklearns_point_with_same_scores():
    X, test_in, test_out = _features(900, 1), _features(300, 2), _features(300, 3, shift=1.5)
    kw = dict(n_components=(3, 6), covariance_type=("full", "tied", "diag", "spherical"), cv=4, max_iter=100)
    fast = GMMScorer(backend="torch", device="cpu", **kw).fit(X)
    ref = GMMScorer(backend="sklearn", **kw).fit(X)
    assert fast.best_params_ == ref.best_params_
    assert [p for p in fast.cv_results_["params"]] == list(ref.cv_results_["params"])
    for i in range(4):
        np.testing.assert_allclose(fast.cv_results_[f"split{i}_test_score"],
                                   ref.cv_results_[f"split{i}_test_score"], atol=ATOL)
    np.testing.assert_array_equal(fast.cv_results_["rank_test_score"], ref.cv_results_["rank_test_score"])
    assert abs(fast.best_score_ - ref.best_score_) < ATOL
    for T in (test_in, test_out):
        np.testing.assert_allclose(fast.score_samples(T), ref.score_samples(T), atol=ATOL)
    a_fast = auroc(fast.score_samples(test_in), fast.score_samples(test_out))
    a_ref = auroc(ref.score_samples(test_in), ref.score_samples(test_out))
    assert abs(a_fast - a_ref) <= 1e-9 and a_ref > 0.6


def test_degenerate_features_duplicates_and_constant_column():
    """Duplicate rows make components collapse to reg_covar; a constant feature standardises to 0."""
    base = _features(200, 4)
    X = np.concatenate([base, np.repeat(base[:20], 10, axis=0)])  # 200 duplicated rows
    X = np.concatenate([X, np.full((len(X), 1), 3.0)], axis=1)     # constant 5th feature
    kw = dict(n_components=(4, 8), covariance_type=("full", "diag"), cv=3, max_iter=100)
    fast = GMMScorer(backend="torch", device="cpu", **kw).fit(X)
    ref = GMMScorer(backend="sklearn", **kw).fit(X)
    assert fast.best_params_ == ref.best_params_
    f, r = fast.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"]
    np.testing.assert_allclose(f, r, rtol=1e-7)  # log-likelihoods of size ~1e1 with tight components
    np.testing.assert_allclose(fast.score_samples(X), ref.score_samples(X), rtol=1e-7, atol=1e-6)


def test_fast_grid_shrinks_on_small_training_sets_and_warns():
    X = _features(60, 5)
    sc = GMMScorer(n_components=(50, 100), covariance_type=("diag", "full"), cv=5, max_iter=50,
                   backend="torch", device="cpu")
    with pytest.warns(UserWarning, match="too small for the GMM grid"):
        sc.fit(X)
    assert sc.best_params_["n_components"] == 4  # folds train on 48 rows: 10 per component
    ref = GMMScorer(n_components=(50, 100), covariance_type=("diag", "full"), cv=5, max_iter=50,
                    backend="sklearn")
    with pytest.warns(UserWarning, match="too small"):
        ref.fit(X)
    assert ref.best_params_ == sc.best_params_


def test_backend_validation_and_auto():
    with pytest.raises(ValueError, match="unknown backend"):
        GMMScorer(backend="jax", n_components=(2,), cv=2).fit(_features(100, 6))
    sc = GMMScorer(n_components=(2,), covariance_type=("diag",), cv=2).fit(_features(100, 6))
    assert sc.backend_ == "torch"


@pytest.mark.parametrize("d,standardize", [(1, False), (3, True)])
def test_kde_fast_path_is_sklearns_kde(d, standardize):
    from sklearn.neighbors import KernelDensity

    rng = np.random.default_rng(7)
    train, test = rng.normal(100, 10, size=(700, d)), rng.normal(100, 30, size=(300, d))
    fast = KDEScorer(standardize=standardize, backend="torch", device="cpu").fit(train)
    ref = KDEScorer(standardize=standardize, backend="sklearn").fit(train)
    np.testing.assert_allclose(fast.score_samples(test), ref.score_samples(test), rtol=1e-12, atol=1e-9)
    # blocks smaller than the problem give the same sums
    Z = StandardScaler().fit_transform(train)
    blocked = gaussian_kde_log_density(Z, Z[:50], 0.5, block_elems=64)
    full = KernelDensity(bandwidth=0.5).fit(Z).score_samples(Z[:50])
    np.testing.assert_allclose(blocked, full, rtol=1e-12)
    # far outside the data: no underflow to -inf
    assert np.isfinite(fast.score_samples(np.full((1, d), 1e4))).all()
