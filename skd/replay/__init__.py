"""A recorded view as batches: the replay source (a cache's recorded views, or an online plan), the
view loader that yields (images, labels, logits), the recorded ops applied on top of a pipeline's
views (mixing, RandAugment, erasing), the cached logits in plan order, and whether a cache can be
replayed here.
"""

from skd.replay.sources import ReplaySource, cached_source, online_source
from skd.replay.view_loader import TrainBatch, ViewLoader, rank_range

__all__ = [
    "ReplaySource",
    "cached_source",
    "online_source",
    "TrainBatch",
    "ViewLoader",
    "rank_range",
]
