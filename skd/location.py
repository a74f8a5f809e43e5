"""Where a cache lives: a local folder, or a prefix in an object store (s3://, gs://, az://).

Every place that takes a cache takes a plain path, a `file://` URL or an object-store URL
(`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`). Object stores are reached with
obstore, configured from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP; GOOGLE_*, AZURE_*): credentials are
never written into a cache nor shown, and the name shown for a URL drops user info and query strings.

An object store has no folders, FIFOs or symlinks: `listing` lists a prefix once (keys and sizes), and
the completeness checks, the storage figures and `check_objects` (the counterpart of
`schema.check_files`) work on that listing.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath, PurePosixPath
from urllib.parse import unquote, urlsplit

from .errors import SkdError
from .schema import SchemaError, rebuild

# obstore's URL schemes that skd takes, by the name they go by here
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az", "abfs": "az", "abfss": "az"}
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# pathlib turns "s3://b/p" into "s3:/b/p": a Path made of a URL is read as that URL
USER = re.compile(r"^[A-Za-z0-9._-]+@[^/@:]+(/|$)")  # abfss://container@account.dfs.core.windows.net/...
COLLAPSED = re.compile(r"^(s3|s3a|gs|gcs|az|azure|abfs|abfss|file):/(?!/)")
MAX_METADATA_BYTES = 2**20  # an array's zarr.json is about 1 KB (as schema's check of a local cache)
HINT = "use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, file:///PATH or a local path"

# zarrs rebuilds obstore's store in its own copy of the object_store crate, and says so for every array
warnings.filterwarnings("ignore", message="Successfully reconstructed a store", category=RuntimeWarning)


class StoreError(SkdError):
    """A cache that cannot be used as asked: str(e) is one line naming the folder and what to do."""


class ObjectPath:
    """An object's name in messages, `s3://bucket/prefix/key`: `/`, `relative_to`, `name` and `parent` as
    pathlib's, so code that names a cache's files works the same on local and object-store caches."""

    __slots__ = ("root", "key")

    def __init__(self, root: str, key: str = ""):
        self.root, self.key = root.rstrip("/"), key.strip("/")

    def __truediv__(self, part) -> ObjectPath:
        return ObjectPath(self.root, f"{self.key}/{part}" if self.key else str(part))

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if self.root != other.root or not (self.key + "/").startswith(other.key + "/" if other.key else ""):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key[len(other.key) :].lstrip("/") or ".")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.root.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.root, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def __str__(self) -> str:
        return f"{self.root}/{self.key}" if self.key else self.root

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and (self.root, self.key) == (other.root, other.key)

    def __hash__(self) -> int:
        return hash((self.root, self.key))


@dataclass(frozen=True)
class Location:
    """A parsed cache argument. `local` is the folder of a local cache (None for an object store);
    `scheme`, `bucket` and `prefix` name an object-store cache; str() is the name to show."""

    display: str
    local: Path | None = None
    scheme: str | None = None
    bucket: str | None = None
    root: str | None = None  # scheme://bucket (or container@account.host)
    prefix: str = ""

    def __str__(self) -> str:
        return self.display

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def path(self) -> Path | ObjectPath:
        """What `Store.path` is: the folder, or the URL as an ObjectPath (for messages)."""
        return self.local if self.local is not None else ObjectPath(self.display)

    @cached_property
    def objects(self):
        """The obstore store rooted at the cache's prefix (keys are relative to it); the URL it is opened
        with is `display` (no secrets: those come from the environment)."""
        return self._open(self.display)

    @cached_property
    def bucket_objects(self):
        """The obstore store of the whole bucket (the lease lives beside the prefix)."""
        return self._open(self.root)

    def _open(self, url: str):
        import obstore.store

        try:
            return obstore.store.from_url(url)
        except Exception as exc:  # obstore raises its own kinds for a bad configuration
            raise StoreError(
                f"{self}: the object store cannot be configured ({_cause(exc)}): "
                "check the AWS_*, GOOGLE_* or AZURE_* environment variables"
            ) from None

    def zarr_store(self, *, read_only: bool):
        """What zarr opens: the folder's name, or a zarr ObjectStore over obstore (served by zarrs)."""
        if self.local is not None:
            return str(self.local)
        import zarr.storage

        _widen_zarr_executor()
        return zarr.storage.ObjectStore(self.objects, read_only=read_only)

    # -- listing ---------------------------------------------------------------------------
    def listing(self, under: str = "") -> dict[str, int]:
        """{key: size in bytes} of every object under the prefix (or under `under` inside it), keys relative
        to the prefix: one listing, a request per 1000 objects. StoreError for a missing bucket, refused
        credentials or an unreachable store."""
        import obstore

        found: dict[str, int] = {}
        try:
            for batch in obstore.list(self.objects, prefix=under.strip("/") or None, chunk_size=1000):
                found.update((meta["path"], int(meta["size"])) for meta in batch)
        except StoreError:
            raise
        except Exception as exc:
            raise self.error(exc) from None
        return found

    def is_empty(self) -> bool:
        """True where the prefix holds no object (a cache there does not exist yet)."""
        if self.local is not None:
            return not self.local.exists() or (self.local.is_dir() and not any(self.local.iterdir()))
        import obstore

        try:
            return not any(len(batch) for batch in obstore.list(self.objects, chunk_size=1))
        except Exception as exc:
            raise self.error(exc) from None

    def put(self, key: str, data: bytes) -> None:
        """Write a whole object in one PUT (atomic: readers see the old object or the new one, never a part)."""
        import obstore

        try:
            obstore.put(self.objects, key, data, use_multipart=False)
        except Exception as exc:
            raise self.error(exc, f"refused to write {key}") from None

    def remove_all(self) -> None:
        """Delete every object under the prefix (`--overwrite` of a cache; the caller checked it is one)."""
        import obstore

        keys = list(self.listing())
        try:
            for i in range(0, len(keys), 1000):
                obstore.delete(self.objects, keys[i : i + 1000])
        except Exception as exc:
            raise self.error(exc) from None

    def error(self, exc: Exception, what: str = "cannot be reached") -> StoreError:
        """The one-line StoreError for a failed request: a missing bucket, refused credentials, no connection."""
        text = str(exc)
        code = _xml(text, "Code") or ""
        status = re.search(r"status code: (\d{3})", text)
        status = int(status.group(1)) if status else None
        if code in ("NoSuchBucket", "ContainerNotFound") or "bucket does not exist" in text.lower():
            return StoreError(
                f"{self}: bucket {self.bucket} does not exist ({self.scheme}): create it or check "
                "the URL and AWS_ENDPOINT_URL"
            )
        if "invalid path" in text.lower():  # a key with an empty, '.' or '..' part: object_store will not list it
            key = re.search(r'[Pp]ath "([^"]{1,200})"', text)
            return StoreError(
                rebuild(
                    f"{self}: object {key.group(1) if key else '(unnamed)'!r} has an empty, '.' "
                    "or '..' part in its key (it would leave the prefix)"
                )
            )
        if status in (401, 403) or code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "InvalidToken",
            "AuthenticationFailed",
        ):
            return StoreError(
                f"{self}: access denied ({code or status}): check the credentials in the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; "
                "GOOGLE_*, AZURE_*) and their permissions on the bucket"
            )
        return StoreError(
            f"{self}: the object store {what} ({_cause(exc)}): check the URL, the endpoint "
            "(AWS_ENDPOINT_URL, AWS_ALLOW_HTTP) and the network"
        )


def parse_location(where) -> Location:
    """A cache argument (a Location, a path, `file://`, `s3://`, `gs://` or `az://` URL) as a Location;
    StoreError for an unknown scheme, a URL without a bucket or one that carries a password."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if isinstance(where, PurePath) and COLLAPSED.match(text):
        text = COLLAPSED.sub(lambda m: m.group(1) + (":///" if m.group(1) == "file" else "://"), text)
    if URL.match(text) is None:
        return Location(display=text, local=Path(text))
    scheme = URL.match(text).group(1).lower()
    rest = text[len(scheme) + 3 :].split("?", 1)[0].split("#", 1)[0]
    if "@" in rest and not (scheme in ("abfs", "abfss") and USER.match(rest)):
        raise StoreError(
            f"cache {scheme}://...: the URL carries user info (an '@'): put credentials in the "
            "environment (AWS_*, GOOGLE_*, AZURE_*), not in the URL"
        )
    parts = urlsplit(text)
    host = parts.hostname or ""
    shown = f"{scheme}://{host}{parts.path}".rstrip("/")  # never user info, a query (SAS tokens) or a fragment
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"cache {shown}: a file:// URL names a local path (file:///PATH), not host {host}")
        return Location(display=unquote(parts.path), local=Path(unquote(parts.path)))
    if scheme not in SCHEMES:
        raise StoreError(f"cache {shown}: unknown scheme {scheme}://: {HINT}")
    if parts.query:
        raise StoreError(
            f"cache {shown}: the URL carries a query (a token?): put credentials in the "
            "environment (AWS_*, GOOGLE_*, AZURE_*), not in the URL"
        )
    bucket = host
    if parts.username:  # abfss://container@account.dfs.core.windows.net/prefix: the container, no secret
        bucket, host = parts.username, f"{parts.username}@{host}"
    if not bucket:
        raise StoreError(f"cache {shown}: the URL names no bucket: {HINT}")
    prefix = unquote(parts.path).strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreError(f"cache {shown}: the prefix has an empty, '.' or '..' part: name it plainly")
    root = f"{scheme}://{host}"
    return Location(
        display=root + (f"/{prefix}" if prefix else ""), scheme=scheme, bucket=bucket, root=root, prefix=prefix
    )


def check_objects(location: Location, listing: dict[str, int]) -> None:
    """The listing-based counterpart of `schema.check_files`: objects cannot be FIFOs or symlinks, so what is
    checked is that every key stays inside the prefix (no empty, '.' or '..' part, no backslash, no
    absolute key), that no object is both a file and a folder of others, and that no zarr.json is over
    MAX_METADATA_BYTES (zarr reads it whole)."""
    for key, size in listing.items():
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise SchemaError(rebuild(f"cache {location}: object {key!r} leaves the prefix or is not a plain key"))
        if parts[-1] == "zarr.json" and size > MAX_METADATA_BYTES:
            raise SchemaError(
                rebuild(f"cache {location}: {key} has {size} bytes, more than zarr metadata's {MAX_METADATA_BYTES}")
            )
    folders = {key.rsplit("/", 1)[0] for key in listing if "/" in key}
    for folder in sorted(folders):
        while folder:
            if folder in listing:
                raise SchemaError(rebuild(f"cache {location}: {folder} is an object and a folder of others"))
            folder = folder.rsplit("/", 1)[0] if "/" in folder else ""


def _xml(text: str, tag: str) -> str | None:
    found = re.search(f"<{tag}>([^<]{{1,80}})</{tag}>", text)
    return found.group(1) if found else None


SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|SAS", re.IGNORECASE)


def scrub(text: str) -> str:
    """`text` with the value of every credential-like environment variable (AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AZURE_STORAGE_ACCOUNT_KEY, ...) masked: messages quote what the store said."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def _cause(exc: Exception) -> str:
    """A short, one-line cause of an obstore error: the service's error code, an HTTP status, or the first
    line of the message, cut short, credentials masked (they are sent in headers, not in messages)."""
    text = scrub(" ".join(str(exc).split()))
    code, status = _xml(text, "Code"), re.search(r"status code: (\d{3})", text)
    if code or status:
        return " ".join(filter(None, [f"HTTP {status.group(1)}" if status else None, code]))
    for marker in ("Connection refused", "dns error", "timed out", "tcp connect error", "certificate"):
        if marker.lower() in text.lower():
            return marker
    return (text[:150] + "...") if len(text) > 150 else (text or type(exc).__name__)


ZARR_IO_THREADS = 32  # zarr's executor, where each zarrs read of an object store waits on its requests


def _widen_zarr_executor() -> None:
    """Give zarr's executor ZARR_IO_THREADS threads (created as needed). zarr sizes it once, by the
    `threading.max_workers` in force at its first use (2 inside a RowReader's opening), and every zarrs read
    runs in it (asyncio.to_thread): against an object store that size would be the number of requests in
    flight in the whole process."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr.core.sync as zsync

    current = zsync._executor
    if current is not None and current._max_workers >= ZARR_IO_THREADS:
        return
    zsync._executor = ThreadPoolExecutor(ZARR_IO_THREADS, thread_name_prefix="zarr_pool")
    zsync._get_loop().set_default_executor(zsync._executor)
    if current is not None:
        current.shutdown(wait=False)  # the reads it runs finish; new ones go to the wider one
