"""skd: an offline teacher-logit cache for Spherical Knowledge Distillation on ImageNet.

The Python API for your own training loop (the README's "Your own training loop"):

    cache = skd.open_cache("cache/r152")
    kd = skd.SphericalKD(temperature=4.0, multiplier=2.0, alpha=0.9)
    for images, labels, logits in cache.loader(epoch, batch_size=256, device="cuda"):
        loss = kd(student(images), logits, labels)

Its names load on first use, so `import skd` (and the command line's start) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "open_cache": "skd.cache",
    "Cache": "skd.cache",
    "CacheError": "skd.errors",
    "SphericalKD": "skd.loss",
    "HintonKD": "skd.loss",
    "soft_labels": "skd.plan.mixing",
    "SkdError": "skd.errors",
    "OptionError": "skd.errors",
    "DatasetError": "skd.errors",
    "BusyError": "skd.errors",
    "DeviceError": "skd.errors",
    "ModelError": "skd.errors",
    "StoreError": "skd.storage.objectstore",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'skd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
