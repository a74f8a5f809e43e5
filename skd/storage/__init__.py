"""Where a cache lives: one `Location` interface with two homes, a folder and an object-store prefix
(s3://, gs://, az:// through obstore), their locks, the checks every file passes before zarr opens
it, and what skd takes from zarr's and zarrs' internals.
"""

from skd.storage.location import LocalFolder, Location, parse_location
from skd.storage.locks import FolderLock, Lease
from skd.storage.objectstore import ObjectPrefix, StoreError

__all__ = [
    "Location",
    "LocalFolder",
    "parse_location",
    "ObjectPrefix",
    "StoreError",
    "FolderLock",
    "Lease",
]
