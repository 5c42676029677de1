"""AUROC per timestep and window, from cached moments only."""

from __future__ import annotations

import numpy as np

from diffpath.core.moments import MOMENTS
from diffpath.study.timesteps import FAMILIES, timestep_table, window_feature


def _cache(rng: np.random.Generator, n: int, shift_step: int | None, T: int = 4) -> dict[str, np.ndarray]:
    """Moments of a per-pixel quantity with 64 values per image; ``shift_step`` scales it there."""
    out = {}
    for key, deriv in FAMILIES.values():
        steps = T - 1 if deriv else T
        q = rng.standard_normal((n, steps, 64))
        if shift_step is not None and shift_step < steps:
            q[:, shift_step] *= 3.0
        a = np.abs(q)
        out[key] = np.stack([q.sum(-1), a.sum(-1), (q * q).sum(-1), (q**3).sum(-1), (a**3).sum(-1)], -1)
    assert out["v2_err"].shape[-1] == len(MOMENTS)
    return out


def test_the_signal_is_found_at_its_timestep():
    rng = np.random.default_rng(0)
    train = {"in": _cache(rng, 200, None)}
    test = {"in": _cache(rng, 100, None), "out": _cache(rng, 100, 2)}
    t = timestep_table(train, test, ["in"], timesteps=[0, 250, 500, 750], families=["score error", "Δ score error"])
    one = t[(t["steps"] == 1) & (t["family"] == "score error")].set_index("t_first")["auroc"]
    assert one[500] > 0.99  # the scaled step: the OOD images are far less likely
    assert all(0.35 < one[s] < 0.65 for s in (0, 250, 750))  # elsewhere: chance
    # derivative steps are labelled by their later timestep
    d = t[(t["steps"] == 1) & (t["family"] == "Δ score error")]
    assert sorted(d["t_last"]) == [250, 500, 750]
    # every contiguous window once per OOD set: 4·5/2 windows of the magnitude
    assert len(t[t["family"] == "score error"]) == 10


def test_window_feature_sums_norms_over_the_window():
    rng = np.random.default_rng(1)
    c = _cache(rng, 3, None)
    m = c["v2_werr"]
    f = window_feature(c, "SSIM-weighted error", 1, 3)
    np.testing.assert_allclose(f[:, 0], m[:, 1:3, 1].sum(1))
    np.testing.assert_allclose(f[:, 1], np.sqrt(m[:, 1:3, 2]).sum(1))
    np.testing.assert_allclose(f[:, 2], np.cbrt(m[:, 1:3, 4]).sum(1))
