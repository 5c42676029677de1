"""DiffPath conformance: reproduce the reference implementation's outputs on a tiny model.

The fixture (tests/fixtures/DIFFPATH_FIXTURE.md) holds the ε path and the twelve statistics the
reference code computes. Tolerances are the fixture's: every ε within 1e-3 absolute; every statistic
within 1e-3 relative to max(|value|, 5% of that statistic's largest |value| in the batch).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from diffpath.methods.diffpath import DIFFPATH_STAT_NAMES, diffpath_1d, diffpath_6d, diffpath_statistics
from diffpath.models import load_model
from diffpath.methods.diffpath import diffpath_path


def assert_stat_close(name, got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    denom = np.maximum(np.abs(ref), 0.05 * np.abs(ref).max())
    rel = np.abs(got - ref) / denom
    assert rel.max() <= 1e-3, f"{name}: max relative error {rel.max():.2e}"


@pytest.fixture(scope="module")
def ref(fixture_dir):
    with np.load(fixture_dir / "diffpath_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir / "diffpath_tiny.pt")


@pytest.fixture(scope="module")
def result(model, ref):
    ts = model.schedule.respaced_timesteps(10)
    return diffpath_path(model, torch.from_numpy(ref["x0"]), ts, clip_denoised=True, keep_maps=True)


def test_model_settings(model):
    assert model.kind == "improved-diffusion"
    assert model.num_timesteps == 4000 and model.schedule.name == "cosine"
    assert model.timestep_scale == pytest.approx(0.25)
    assert model.schedule.respaced_timesteps(10) == list(range(0, 4000, 400))


def test_eps_path_matches_reference(result, ref):
    err = np.abs(result.eps.numpy() - ref["eps"]).max()
    assert err <= 1e-3, f"max |Δε| = {err:.2e}"
    assert np.abs(result.xt.numpy() - ref["xt"]).max() <= 1e-3
    assert np.abs(result.xT.numpy() - ref["xT"]).max() <= 1e-3


def test_statistics_match_reference(result, ref):
    stats = diffpath_statistics(result.eps_moments, result.deps_moments)
    assert tuple(stats) == DIFFPATH_STAT_NAMES
    for name in DIFFPATH_STAT_NAMES:
        assert_stat_close(name, stats[name], ref[f"stat_{name}"])
    f6 = diffpath_6d(stats)
    for j in range(6):
        assert_stat_close(f"features_6d[:, {j}]", f6[:, j], ref["features_6d"][:, j])
    assert_stat_close("curvature_1d", diffpath_1d(stats), ref["curvature_1d"])


def test_statistics_from_reference_eps_are_exact(ref):
    """Given the reference's own ε path, the moments → statistics step is exact (float64)."""
    from diffpath.core.moments import moments

    eps = torch.from_numpy(ref["eps"]).double()
    T = eps.shape[1]
    m = torch.stack([moments(eps[:, i]) for i in range(T)], 1)
    dm = torch.stack([moments((eps[:, i + 1] - eps[:, i]) * T) for i in range(T - 1)], 1)
    stats = diffpath_statistics(m, dm)
    for name in DIFFPATH_STAT_NAMES:
        np.testing.assert_allclose(stats[name], ref[f"stat_{name}"], rtol=1e-6, atol=1e-6 * np.abs(ref[f"stat_{name}"]).max())


def test_cli_features_reproduces_reference(tmp_path, fixture_dir, ref):
    images = tmp_path / "x0.npz"
    np.savez(images, x0=ref["x0"])
    out = tmp_path / "out.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "diffpath", "features", "--model", str(fixture_dir / "diffpath_tiny.pt"),
         "--images", str(images), "--method", "diffpath", "--steps", "10", "--out", str(out),
         "--device", "cpu", "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as z:
        for name in DIFFPATH_STAT_NAMES:
            assert_stat_close(name, z[name], ref[f"stat_{name}"])
        assert z["features_6d"].shape == (6, 6) and z["curvature_1d"].shape == (6,)
        assert_stat_close("curvature_1d", z["curvature_1d"], ref["curvature_1d"])
        for j in range(6):
            assert_stat_close(f"features_6d[:, {j}]", z["features_6d"][:, j], ref["features_6d"][:, j])
