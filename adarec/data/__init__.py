"""Data loading, leave-one-out split, on-device augmentation and batch sampling."""

from adarec.data.augment import crop, mask, random_views, reorder
from adarec.data.io import UserSequences, read_sequences
from adarec.data.sampler import TrainBatchSampler, sample_negatives
from adarec.data.split import SplitData, build_split

__all__ = [
    "SplitData",
    "TrainBatchSampler",
    "UserSequences",
    "build_split",
    "crop",
    "mask",
    "random_views",
    "read_sequences",
    "reorder",
    "sample_negatives",
]
