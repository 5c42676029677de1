"""The error every model loader raises (re-exported by :mod:`diffpath.models`)."""

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded (missing file, mismatched keys, bad settings)."""
