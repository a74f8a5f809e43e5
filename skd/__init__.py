"""skd: an offline teacher-logit cache for Spherical Knowledge Distillation on ImageNet."""

__version__ = "0.1.0"
