"""The walkthroughs' and the report's figure helpers: a colour bar per row of maps, one scale per
row; score histograms whose axis shows both sets."""

from __future__ import annotations

import numpy as np
import pytest

from diffpath.study.figures import Row, map_rows, verdict_axes
from diffpath.study.report import histogram_axis, plot_histograms


@pytest.fixture(autouse=True)
def _close():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_map_rows_draws_each_row_on_its_scale_with_a_colour_bar():
    rng = np.random.default_rng(0)
    rows = [Row("x_t", [rng.normal(size=(1, 8, 8)) for _ in range(3)], vmin=-3, vmax=3, unit="x_t"),
            Row("ssim", [rng.random((8, 8)), None, rng.random((8, 8))], cmap="viridis", vmin=0, vmax=1,
                outline=np.eye(8, dtype=bool))]
    fig = map_rows(rows, ["t = 0", "t = 1", "t = 2"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 5 and [im.get_clim() for im in images[:3]] == [(-3, 3)] * 3
    assert all(im.get_clim() == (0, 1) for im in images[3:])
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and {b.get_ylabel() for b in bars} == {"x_t", ""}
    assert fig.axes[3].get_ylabel() == "ssim" and fig.axes[0].get_title() == "t = 0"


def test_histogram_axis_keeps_the_in_distribution_set_visible():
    rng = np.random.default_rng(0)
    s_in = rng.normal(-5, 2, 300)
    near = rng.normal(-9, 3, 300)
    edges, linthresh = histogram_axis(s_in, near)
    assert linthresh is None and np.allclose(np.diff(edges), np.diff(edges)[0])  # comparable spreads: linear
    far = -np.exp(rng.uniform(2, 8, 300))  # an OOD set thousands of nats lower
    edges, linthresh = histogram_axis(s_in, far)
    p1, p99 = np.percentile(s_in, [1, 99])
    assert linthresh == pytest.approx(max(abs(p1), abs(p99), p99 - p1))
    inside = np.count_nonzero((edges > p1) & (edges < p99))
    assert inside >= 5  # a linear axis over the same range would give it at most one bin of 40
    ax = plot_histograms({"in": s_in, "out": far}, "in", "out")
    assert ax.get_xscale() == "symlog" and ax.get_legend() is None


def test_verdict_axes_marks_the_threshold_and_the_images():
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    verdict_axes(ax, np.zeros(10), -np.ones(10), -0.5, {"a": 0.1, "b": -2.0}, in_label="in", out_label="out")
    lines = [ln.get_xdata()[0] for ln in ax.lines]
    assert lines == [-0.5, 0.1, -2.0] and ax.get_xlim()[0] <= -2.0
