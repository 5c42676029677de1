"""Data: one registry for the embedded and paper sets, model-input preprocessing, the user's image
files and the synthetic anomaly benchmark.

The public API of the registry is re-exported here::

    from diffpath.data import load_split, prepare, to_model_input
"""

from diffpath.data.base import SPLITS, DatasetInfo, DatasetUnavailableError, Split, checksum
from diffpath.data.embedded import EMBEDDED, FASHION_MNIST_DIR, letter_fonts, read_idx
from diffpath.data.paper import default_root
from diffpath.data.preprocess import RESIZE_METHODS, rgb_to_luma, to_model_input
from diffpath.data.registry import available_datasets, dataset_info, load_split, prepare, subset_indices

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "Split",
    "checksum",
    "EMBEDDED",
    "FASHION_MNIST_DIR",
    "letter_fonts",
    "read_idx",
    "default_root",
    "RESIZE_METHODS",
    "rgb_to_luma",
    "to_model_input",
    "available_datasets",
    "dataset_info",
    "load_split",
    "prepare",
    "subset_indices",
]
