"""The dataset: a sorted ImageFolder scan with header-only image sizes and fingerprints, and image
probing (EXIF-aware size, JPEG end marker, tail digest).
"""

from skd.data.image_probe import image_size
from skd.data.index import Split, index_dataset

__all__ = ["Split", "index_dataset", "image_size"]
