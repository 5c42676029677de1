"""Batched expectation-maximisation for Gaussian mixtures in torch (float64).

The fast path of :class:`diffpath.scoring.scorers.GMMScorer`'s grid search. It runs the same
algorithm as scikit-learn's ``GaussianMixture`` (k-means initialisation, EM until the change of the
mean log-likelihood falls below ``tol`` or ``max_iter`` is reached, ``reg_covar`` on the diagonal,
``n_init = 1``) for several problems at once: the folds of a cross-validation are one batch, each
with its own standardised copy of the data and a 0/1 weight per row that says which rows it trains
on. The rows it does not train on are its held-out fold, scored in the same pass.

What differs from scikit-learn is only the order of floating-point operations:

* the E and M steps are fused: one pass over row chunks evaluates the log-densities with the current
  parameters and accumulates the sufficient statistics ``Σ r``, ``Σ r x``, ``Σ r x xᵀ`` of the next
  M step, so memory is bounded by the chunk, not by ``N × K``;
* covariances are ``Σ r x xᵀ / N_k − μ μᵀ`` rather than a second, centred pass (features are
  standardised, so the cancellation costs ~1e-16 × |x|² / var: ~1e-12 relative for var ~1e-4);
* sums run in a different order (chunks, batched matrix products).

Each of these changes a result by a few units in the last place per iteration; EM contracts such
perturbations near a fixed point, and the stopping rule only changes if a log-likelihood change lies
within ~1e-12 of ``tol``. The initial labels come from scikit-learn's own ``KMeans`` (``n_init=1``,
the same seed), which is what makes both paths start from the same point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

__all__ = ["COVARIANCE_TYPES", "BatchedEM", "EMResult", "kmeans_labels", "kmeans_one", "run_tasks"]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_EPS10 = 10 * np.finfo(np.float64).eps  # scikit-learn adds this to every N_k


def kmeans_labels(Xs: Sequence[np.ndarray], n_components: int, random_state: int | None,
                  n_jobs: int = 1) -> list[np.ndarray]:
    """scikit-learn's GMM initialisation: ``KMeans(n_init=1)`` labels of each array.

    Args:
        Xs: arrays (N_i, D), standardised as the mixture will see them.
        n_components: clusters K.
        random_state: the mixture's seed (a fresh ``RandomState(seed)`` per fit, as in scikit-learn).
        n_jobs: arrays clustered in parallel threads (KMeans releases the GIL).
    Returns:
        one label array (N_i,) per input, values in [0, K).
    """

    return run_tasks([lambda X=X: kmeans_one(X, n_components, random_state) for X in Xs], n_jobs)


def kmeans_one(X: np.ndarray, n_components: int, random_state: int | None) -> np.ndarray:
    """``KMeans(n_init=1)`` labels of X, with one OpenMP thread (its result does not depend on the
    thread count then: several threads sum the chunks' centres in the order they finish)."""
    rs = np.random.RandomState(random_state) if random_state is not None else None
    # OpenMP's thread count is a per-thread setting, so this holds in a worker thread too
    with threadpool_limits(limits=1, user_api="openmp"):
        return KMeans(n_clusters=n_components, n_init=1, random_state=rs).fit(X).labels_


def run_tasks(tasks: Sequence, n_jobs: int = 1) -> list:
    """Call each task (a function of no arguments) and return the results in order.

    With ``n_jobs > 1`` they run in that many threads: the work is NumPy/BLAS, torch and
    scikit-learn's Cython k-means, which release the GIL. BLAS is held to one thread meanwhile
    (process-wide), so every task computes exactly what it computes alone: the results do not
    depend on ``n_jobs`` (tests/test_scorers_fast.py checks this bit for bit).
    """
    tasks = list(tasks)
    if n_jobs <= 1 or len(tasks) <= 1:
        with threadpool_limits(limits=1, user_api="blas"):
            return [t() for t in tasks]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's intra-op pool too: n_jobs threads in all
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = [pool.submit(t) for t in tasks]
            return [f.result() for f in futures]
    finally:
        torch.set_num_threads(torch_threads)


@dataclass
class EMResult:
    """Per-problem outcome of :meth:`BatchedEM.fit` (B problems, K components, D features).

    Attributes:
        weights: (B, K). means: (B, K, D). covariances: (B, K, D, D) full, (B, D, D) tied,
            (B, K, D) diag, (B, K) spherical. precisions_cholesky: same shapes (upper-triangular
            factors for full and tied, as scikit-learn stores them).
        lower_bound: (B,) mean training log-likelihood at the last E step.
        heldout: (B,) mean log-likelihood of the rows with weight 0 under the final parameters
            (NaN where a problem has none).
        n_iter: (B,) EM iterations run. converged: (B,) bool. failed: (B,) bool: a covariance was
            not positive definite (scikit-learn raises; a grid search scores it -inf).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    lower_bound: np.ndarray
    heldout: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    failed: np.ndarray


class BatchedEM:
    """EM for B Gaussian mixtures of one covariance type at once.

    Args:
        covariance_type: ``full``, ``tied``, ``diag`` or ``spherical``.
        reg_covar, tol, max_iter: as scikit-learn's ``GaussianMixture``.
        device: torch device. chunk_elems: bound on the elements of the largest per-chunk tensor
            (B × rows × K × D for full), i.e. on memory.
    """

    def __init__(self, covariance_type: str, reg_covar: float = 1e-6, tol: float = 1e-3,
                 max_iter: int = 100, device: str | torch.device = "cpu", chunk_elems: int = 1 << 24):
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"unknown covariance_type {covariance_type!r}")
        self.cov = covariance_type
        self.reg_covar = float(reg_covar)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.device = torch.device(device)
        self.chunk_elems = int(chunk_elems)

    # ---------------------------------------------------------------- parameters from statistics
    def _params(self, nk, s1, s2, xtx, eye):
        """M step from sufficient statistics.

        Args: nk (b, K) (with the 10·eps added); s1 (b, K, D) = Σ r x; s2: Σ r x xᵀ (b, K, D, D)
            for full, Σ r x² (b, K, D) for diag/spherical, None for tied; xtx (b, D, D) = Σ_train x xᵀ.
        Returns: means, covariances, precisions_cholesky, log_det (b, K) or (b,), ok (b,) bool.
        """
        means = s1 / nk[..., None]
        reg = self.reg_covar
        if self.cov == "full":
            cov = s2 / nk[..., None, None] - means[..., :, None] * means[..., None, :]
            cov = cov + reg * eye
            L, info = torch.linalg.cholesky_ex(cov)
            ok = (info == 0).all(dim=-1)
            L = torch.where(ok[:, None, None, None], L, eye.expand_as(L))
            Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
            pc = Linv.transpose(-1, -2)
            log_det = torch.log(torch.diagonal(pc, dim1=-2, dim2=-1)).sum(-1)
        elif self.cov == "tied":
            cov = xtx - torch.einsum("bk,bkd,bke->bde", nk, means, means)
            cov = cov / nk.sum(-1)[:, None, None] + reg * eye
            L, info = torch.linalg.cholesky_ex(cov)
            ok = info == 0
            L = torch.where(ok[:, None, None], L, eye.expand_as(L))
            pc = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False).transpose(-1, -2)
            log_det = torch.log(torch.diagonal(pc, dim1=-2, dim2=-1)).sum(-1)
        else:
            m1 = s1 / nk[..., None]
            cov = s2 / nk[..., None] - 2 * means * m1 + means * means + reg
            if self.cov == "spherical":
                cov = cov.mean(-1)
            ok = (cov > 0).flatten(1).all(-1)
            pc = torch.rsqrt(torch.where(cov > 0, cov, torch.ones_like(cov)))
            D = means.shape[-1]
            log_det = torch.log(pc).sum(-1) if self.cov == "diag" else D * torch.log(pc)
        return means, cov, pc, log_det, ok

    def _bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched matrix product; on the CPU through NumPy's BLAS (measured 2× torch's for these
        thin float64 shapes), sharing memory both ways."""
        if a.device.type == "cpu":
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
        return torch.bmm(a, b)

    def _phi(self, X: torch.Tensor) -> torch.Tensor:
        """Features whose linear combinations are the log-densities, (b, n, P) from X (b, n, D).

        full: [1, x, x_i x_j (i ≤ j)]; diag/spherical: [1, x, x²]; tied: [1, x] (the shared
        quadratic term −½ xᵀΛx is the same for every component and is added per row).
        """
        D = X.shape[-1]
        parts = [torch.ones_like(X[..., :1]), X]
        if self.cov == "full":
            iu, ju = torch.triu_indices(D, D, device=X.device)
            parts.append(X[..., iu] * X[..., ju])
        elif self.cov != "tied":
            parts.append(X * X)
        return torch.cat(parts, dim=-1).contiguous()

    def _theta(self, means, pc, log_det, log_w):
        """Coefficients (b, P, K) with ``phi(x) @ theta = log π_k + log N(x | k)`` (tied: up to the
        per-row term −½ xᵀΛx).

        log N = −½ xᵀΛx + μᵀΛx − ½ μᵀΛμ − ½ D log 2π + log|L|, Λ = L Lᵀ the precision; one matrix
        product evaluates every component. In standardised space the cancellation between the terms
        costs ~1e-16 × ‖Λ‖ × ‖x‖² absolute (1e-9 for a component as tight as reg_covar).
        """
        b, K, D = means.shape
        if self.cov in ("full", "tied"):
            lam = pc @ pc.transpose(-1, -2)
            if self.cov == "tied":
                lam = lam[:, None].expand(b, K, D, D)
            lin = torch.einsum("bkde,bke->bkd", lam, means)
            if self.cov == "full":
                iu, ju = torch.triu_indices(D, D, device=means.device)
                quad = [-lam[..., iu, ju] * torch.where(iu == ju, 0.5, 1.0).to(lam)]
            else:
                quad = []
        else:
            prec = pc * pc
            if self.cov == "spherical":
                prec = prec[..., None].expand(b, K, D)
            lin = prec * means
            quad = [-0.5 * prec]
        ld = log_det if log_det.dim() == 2 else log_det[:, None].expand(b, K)
        const = -0.5 * (lin * means).sum(-1) - 0.5 * D * math.log(2 * math.pi) + ld + log_w
        return torch.cat([const[..., None], lin, *quad], dim=-1).transpose(1, 2).contiguous()

    def _rows_per_chunk(self, b: int, K: int) -> int:
        return max(256, self.chunk_elems // max(1, 2 * b * K))

    def _pass(self, phi, w, params, want_stats: bool):
        """One pass over row chunks: log-likelihood sums and (optionally) next-M-step statistics.

        Args: phi (b, N, P) from :meth:`_phi`; w (b, N); params (means, pc, log_det, log_w).
        Returns: ll_train (b,), ll_test (b,), and nk (b, K), s1 (b, K, D), s2 (b, K, D, D)
        = Σ r x xᵀ (diag/spherical: its diagonal (b, K, D); tied: None), or Nones.
        """
        means, pc = params[0], params[1]
        b, N, P = phi.shape
        D = means.shape[-1]
        theta = self._theta(*params)
        K = theta.shape[-1]
        step = self._rows_per_chunk(b, K)
        ll_train = phi.new_zeros(b)
        ll_test = phi.new_zeros(b)
        G = phi.new_zeros(b, K, P)
        for i in range(0, N, step):
            ph, wc = phi[:, i:i + step], w[:, i:i + step]
            lp = self._bmm(ph, theta)  # (b, n, K)
            mx = lp.amax(-1, keepdim=True)
            e = torch.exp(lp - mx)
            tot = e.sum(-1, keepdim=True)
            norm = (mx + torch.log(tot)).squeeze(-1)  # (b, n)
            if self.cov == "tied":
                y = self._bmm(ph[..., 1:], pc)
                norm = norm - 0.5 * (y * y).sum(-1)
            ll_train += (norm * wc).sum(-1)
            ll_test += (norm * (1 - wc)).sum(-1)
            if want_stats:  # G = Σ_n r_nk phi_n with r = e / tot, the weight folded into phi
                G += self._bmm(e.transpose(1, 2), ph * (wc[..., None] / tot))
        if not want_stats:
            return ll_train, ll_test, None, None, None
        return (ll_train, ll_test, *self._unpack(G, D))

    def _pass_rows(self, phi: np.ndarray, theta: np.ndarray, pc_tied: np.ndarray | None, rows: int,
                   want_stats: bool) -> tuple[float, np.ndarray | None]:
        """:meth:`_pass` for one problem whose rows all train, on the CPU, in row chunks (NumPy's
        BLAS for the two matrix products, torch's vectorised exp in place).

        Args: phi (N, P) C-contiguous; theta (P, K); pc_tied (D, D) for tied, else None.
        Returns: the summed log-likelihood and G = Σ_n r_nk phi_n (K, P) (or None).
        """
        N, P = phi.shape
        K = theta.shape[1]
        buf = np.empty((min(rows, N), K))
        tbuf = torch.from_numpy(buf)  # shares memory: torch's vectorised exp, in place
        G = np.zeros((K, P)) if want_stats else None
        ll = 0.0
        for i in range(0, N, rows):
            ph = phi[i:i + rows]
            n = len(ph)
            lp = buf[:n]
            np.matmul(ph, theta, out=lp)  # (n, K) log π_k + log N(x | k)
            mx = lp.max(axis=1)
            lp -= mx[:, None]
            tbuf[:n].exp_()
            tot = lp.sum(axis=1)
            norm = mx + np.log(tot)
            if pc_tied is not None:
                y = ph[:, 1:] @ pc_tied
                norm -= 0.5 * np.einsum("nd,nd->n", y, y)
            ll += float(norm.sum())
            if want_stats:
                G += lp.T @ (ph / tot[:, None])
        return ll, G

    def fit_rows(self, X: np.ndarray, labels: np.ndarray, n_components: int,
                 X_test: np.ndarray | None = None, rows: int | None = None) -> EMResult:
        """EM for one problem (B = 1) on the CPU: the fold-at-a-time path of the grid search.

        Same algorithm and stopping rule as :meth:`fit`; it passes over the training rows only and
        scores ``X_test`` (the held-out fold) once, under the final parameters.

        Args:
            X: (N, D) standardised training rows. labels: (N,) their k-means labels.
            X_test: (M, D) held-out rows, or None (``heldout`` is then NaN).
            rows: rows per chunk; default ``131072 // K`` (a 1 MiB chunk of log-densities: measured
                ~30% faster per iteration than one chunk of all rows, and than 256 KiB chunks).
        """
        if self.device.type != "cpu":
            raise ValueError("fit_rows runs on the CPU; use fit for a batched GPU problem")
        K = int(n_components)
        rows = int(rows) if rows else max(64, 131072 // K)
        X = np.ascontiguousarray(X, dtype=np.float64)
        N, D = X.shape
        Xt = torch.from_numpy(X)[None]
        wt = torch.ones(1, N, dtype=torch.float64)
        eye = torch.eye(D, dtype=torch.float64)
        xtx = (Xt[0].T @ Xt[0])[None] if self.cov == "tied" else None
        phi = self._phi(Xt)[0].numpy()
        means, cov, pc, log_det, log_w, ok = self._init(Xt, wt, labels[None], K, xtx, eye)
        failed, converged, n_iter, lower = not bool(ok[0]), False, 0, -math.inf
        for it in range(1, self.max_iter + 1):
            if failed:
                break
            theta = self._theta(means, pc, log_det, log_w)[0].numpy()
            ll, G = self._pass_rows(phi, theta, pc[0].numpy() if self.cov == "tied" else None, rows, True)
            nk, s1, s2 = self._unpack(torch.from_numpy(G)[None], D)
            nk = nk + _EPS10
            m, c, p, ld, ok = self._params(nk, s1, s2, xtx, eye)
            new_lb = ll / N
            change = new_lb - lower
            lower, n_iter = new_lb, it
            if not bool(ok[0]):  # scikit-learn raises; the grid search scores it -inf
                failed = True
                break
            means, cov, pc, log_det = m, c, p, ld
            log_w = torch.log(nk / nk.sum(-1, keepdim=True))
            if abs(change) < self.tol:
                converged = True
                break
        heldout = math.nan
        if failed:
            heldout = -math.inf
        elif X_test is not None and len(X_test):
            Tt = torch.from_numpy(np.ascontiguousarray(X_test, dtype=np.float64))[None]
            theta = self._theta(means, pc, log_det, log_w)[0].numpy()
            lt, _ = self._pass_rows(self._phi(Tt)[0].numpy(), theta,
                                    pc[0].numpy() if self.cov == "tied" else None, rows, False)
            heldout = lt / len(X_test)
        cpu = lambda t: t.detach().cpu().numpy()
        return EMResult(weights=cpu(torch.exp(log_w)), means=cpu(means), covariances=cpu(cov),
                        precisions_cholesky=cpu(pc), lower_bound=np.array([lower]),
                        heldout=np.array([heldout]), n_iter=np.array([n_iter]),
                        converged=np.array([converged]), failed=np.array([failed]))

    def _init(self, Xt, wt, labels, K, xtx, eye):
        """Initial parameters from one-hot k-means responsibilities (weights N_k / N, not
        renormalised, as scikit-learn). Xt (b, N, D), wt (b, N), labels (b, N)."""
        B, N, _ = Xt.shape
        lab = torch.as_tensor(labels, dtype=torch.long, device=Xt.device).clamp_(0, K - 1)
        R0 = torch.zeros(B, N, K, dtype=torch.float64, device=Xt.device)
        R0.scatter_(2, lab[..., None], wt[..., None])
        nk = R0.sum(1) + _EPS10
        s1 = torch.bmm(R0.transpose(1, 2), Xt)
        if self.cov == "full":
            s2 = torch.einsum("bnk,bnd,bne->bkde", R0, Xt, Xt)
        elif self.cov == "tied":
            s2 = None
        else:
            s2 = torch.bmm(R0.transpose(1, 2), Xt * Xt)
        del R0
        means, cov, pc, log_det, ok = self._params(nk, s1, s2, xtx, eye)
        log_w = torch.log(nk / wt.sum(-1)[:, None])
        return means, cov, pc, log_det, log_w, ok

    def _unpack(self, G, D):
        """nk, s1, s2 from the accumulated ``G = Σ_n r_nk phi_n`` (b, K, P)."""
        nk, s1, s2 = G[..., 0], G[..., 1:1 + D], None
        if self.cov == "full":
            iu, ju = torch.triu_indices(D, D, device=G.device)
            s2 = G.new_zeros(*G.shape[:2], D, D)
            s2[..., iu, ju] = G[..., 1 + D:]
            s2[..., ju, iu] = G[..., 1 + D:]
        elif self.cov != "tied":
            s2 = G[..., 1 + D:]
        return nk, s1, s2

    # ---------------------------------------------------------------- the EM loop
    def fit(self, X: np.ndarray, w: np.ndarray, labels: np.ndarray, n_components: int) -> EMResult:
        """Run EM on B problems.

        Args:
            X: (B, N, D) float64, each problem's (standardised) rows.
            w: (B, N) 1 for a row the problem trains on, 0 for a held-out row.
            labels: (B, N) k-means labels of the training rows (ignored where w is 0).
            n_components: K.
        """
        dev = self.device
        Xt = torch.as_tensor(np.ascontiguousarray(X), dtype=torch.float64, device=dev)
        wt = torch.as_tensor(w, dtype=torch.float64, device=dev)
        B, N, D = Xt.shape
        K = int(n_components)
        eye = torch.eye(D, dtype=torch.float64, device=dev)
        n_train = wt.sum(-1)
        xtx = torch.einsum("bn,bnd,bne->bde", wt, Xt, Xt) if self.cov == "tied" else None
        phi = self._phi(Xt)  # (B, N, P), shared by every iteration

        means, cov, pc, log_det, log_w, ok = self._init(Xt, wt, labels, K, xtx, eye)

        state = {"means": means, "cov": cov, "pc": pc, "log_det": log_det, "log_w": log_w}
        failed = ~ok
        lower = torch.full((B,), -math.inf, dtype=torch.float64, device=dev)
        n_iter = torch.zeros(B, dtype=torch.long, device=dev)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        active = torch.nonzero(~failed).flatten()
        for it in range(1, self.max_iter + 1):
            if active.numel() == 0:
                break
            a = active
            sub = lambda t: t.index_select(0, a)
            params = (sub(state["means"]), sub(state["pc"]), sub(state["log_det"]), sub(state["log_w"]))
            pa = phi if a.numel() == B else phi.index_select(0, a)
            wa = wt if a.numel() == B else wt.index_select(0, a)
            ll, _, nk, s1, s2 = self._pass(pa, wa, params, want_stats=True)
            nk = nk + _EPS10
            m, c, p, ld, ok = self._params(nk, s1, s2, sub(xtx) if xtx is not None else None, eye)
            new_lb = ll / n_train.index_select(0, a)
            change = new_lb - lower.index_select(0, a)
            # scikit-learn keeps the parameters of this M step, then tests the change
            good = ok.clone()
            ga = a[good]
            state["means"][ga] = m[good]
            state["cov"][ga] = c[good]
            state["pc"][ga] = p[good]
            state["log_det"][ga] = ld[good]
            state["log_w"][ga] = torch.log(nk[good] / nk[good].sum(-1, keepdim=True))
            lower[a] = new_lb
            n_iter[a] = it
            failed[a[~ok]] = True
            done = good & (change.abs() < self.tol)
            converged[a[done]] = True
            active = a[good & ~done]

        # held-out rows under the final parameters (the grid search's score)
        heldout = torch.full((B,), math.nan, dtype=torch.float64, device=dev)
        n_test = N - n_train
        has_test = (n_test > 0) & ~failed
        if has_test.any():
            idx = torch.nonzero(has_test).flatten()
            sub = lambda t: t.index_select(0, idx)
            params = (sub(state["means"]), sub(state["pc"]), sub(state["log_det"]), sub(state["log_w"]))
            _, lt, *_ = self._pass(phi.index_select(0, idx), wt.index_select(0, idx), params, want_stats=False)
            heldout[idx] = lt / n_test.index_select(0, idx)
        heldout[failed] = -math.inf
        weights = torch.exp(state["log_w"])
        cpu = lambda t: t.detach().cpu().numpy()
        return EMResult(weights=cpu(weights), means=cpu(state["means"]), covariances=cpu(state["cov"]),
                        precisions_cholesky=cpu(state["pc"]), lower_bound=cpu(lower), heldout=cpu(heldout),
                        n_iter=cpu(n_iter), converged=cpu(converged), failed=cpu(failed))
