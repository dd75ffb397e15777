"""vitkit's data layer: every command reads data sets, data roots and images through it.

>>> from vitkit.data import DataConfig, build_data, load_split
>>> data = build_data(DataConfig("cifar10", batch_size=128), device="cpu", seed=0)   # training streams
>>> test = load_split("cifar10", "test")                                             # one labelled split
>>> for images, targets in data.train.batches(epoch=0, start_step=0): ...

Data roots, in order: an explicit ``data_dir`` / ``--data-dir``, ``$VITKIT_DATA``, the user cache
(where ``vitkit data download`` writes), the project's shared data (:func:`data_roots`).
"""

from vitkit.data.config import DataConfig
from vitkit.data.folder import IMG_EXTENSIONS, ClassMismatchError, CorruptImageError, read_image
from vitkit.data.pipeline import Data, build_data
from vitkit.data.sources import NAMED_DATASETS, DatasetNotFoundError, data_roots, locate, locate_named, user_cache_dir
from vitkit.data.splits import Split, load_split
from vitkit.data.transforms import EvalTransform, eval_transform

__all__ = ["ClassMismatchError", "CorruptImageError", "Data", "DataConfig", "DatasetNotFoundError", "EvalTransform",
           "IMG_EXTENSIONS", "NAMED_DATASETS", "Split", "build_data", "data_roots", "eval_transform", "load_split",
           "locate", "locate_named", "read_image", "user_cache_dir"]
