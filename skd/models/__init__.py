"""Teachers and students by torchvision name, `timm:NAME` or `py:module:callable`; a teacher's input
recipe (size, interpolation, mean and std, and where each came from); the runtime (device, torchrun
process group, AMP, channels_last).
"""

from skd.models.recipe import resolve
from skd.models.runtime import Dist, init_distributed
from skd.models.teachers import create_model, load_teacher

__all__ = ["create_model", "load_teacher", "resolve", "Dist", "init_distributed"]
