"""The recorded augmentation, as pure functions of (seed, view, sample id): each view's sample
order, RandomResizedCrop windows and flips, MixUp/CutMix partners and weights, RandAugment ops and
erasing boxes, all drawn from one counter-based scheme (`draws`) so that no draw depends on batch
size or process count.
"""

from skd.plan.augment import AugmentParams
from skd.plan.crops import CropParams, ViewPlan, plan_view
from skd.plan.mixing import MixParams, soft_labels

__all__ = ["CropParams", "ViewPlan", "plan_view", "MixParams", "soft_labels", "AugmentParams"]
