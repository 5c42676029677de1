"""diffpath: zero-shot OOD and anomaly detection with pretrained diffusion models.

Reproduces DiffPath (Heng et al., NeurIPS 2024), DiffPathV2 (Abdi et al., ICCV 2025 workshop) and
DIVAD-style anomaly localisation (Hicsonmez et al.). The package holds the GPU-bound code; the study
itself is a DVC pipeline of notebooks (see the README).
"""

__version__ = "0.1.0"
