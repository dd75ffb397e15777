"""vitkit's input pipeline: named in-memory data sets and class-folder trees, deterministic and resumable.

>>> from vitkit.data import DataConfig, build_data
>>> data = build_data(DataConfig("cifar10", batch_size=128), device="cpu", seed=0)
>>> for images, targets in data.train.batches(epoch=0, start_step=0): ...
"""

from vitkit.data.config import DataConfig
from vitkit.data.folder import CorruptImageError, load_eval_image
from vitkit.data.pipeline import Data, build_data
from vitkit.data.sources import NAMED_DATASETS, DatasetNotFoundError, data_roots, locate_named

__all__ = ["CorruptImageError", "Data", "DataConfig", "DatasetNotFoundError", "NAMED_DATASETS", "build_data",
           "data_roots", "load_eval_image", "locate_named"]
