"""An open cache as zarr arrays: its attributes, samples and plan (checked against the schema), the
codecs its logits are stored in, creating and growing one, reading rows in order and writing whole
shards.
"""

from skd.store.cache_store import VAL, Store, open_store
from skd.store.codecs import Codec, get_codec
from skd.store.creation import create_store
from skd.store.reader import RowReader
from skd.store.writer import ShardWriter

__all__ = [
    "VAL",
    "Store",
    "open_store",
    "Codec",
    "get_codec",
    "create_store",
    "RowReader",
    "ShardWriter",
]
