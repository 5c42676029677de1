from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


class ReconstructingEps:
    """The oracle ε-model of a fixed clean batch ``x0``: ε(x, t) = (x − √ᾱ_t·x0)/√(1 − ᾱ_t).

    Exactly the noise that takes ``x0`` to ``x`` at timestep t, so every DDIM step predicts x0
    itself; computed in float64 and returned in ``x``'s dtype. It carries what the samplers ask of
    a model (``schedule``, ``channels``, ``image_size``, ``device``).
    """

    def __init__(self, x0, schedule):
        import torch

        self.x0 = x0
        self.schedule = schedule
        self.channels, self.image_size = int(x0.shape[1]), int(x0.shape[-1])
        self.device = torch.device("cpu")
        self._ab = torch.from_numpy(schedule.alphas_cumprod)

    def __call__(self, x, t):
        ab = self._ab[t.cpu()].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()).to(x.dtype)
