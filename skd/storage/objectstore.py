"""A cache under a prefix of an object store (s3://, gs://, az://), reached through obstore.

`ObjectPrefix` is the object-store side of `skd.storage.location`'s `Location`: the same questions
(what is there, write this whole object, lock the cache, what does a failed request mean) answered
with one listing of the prefix, one PUT per object and a lease beside the prefix. Stores are
configured from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP; GOOGLE_*, AZURE_*): credentials are
never written into a cache nor shown, and the name shown for a URL drops user info and query
strings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property

from skd.errors import CacheError, SkdError
from skd.storage.files import MAX_METADATA_BYTES, rebuild
from skd.storage.locks import Lease

# obstore's URL schemes that skd takes, by the name they go by here
SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "abfs": "az",
    "abfss": "az",
}
# the error codes object stores put in a refused request's XML body (obstore folds most into
# GenericError)
MISSING_BUCKET_CODES = ("NoSuchBucket", "ContainerNotFound")
ACCESS_CODES = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
)
ACCESS_CODES += ("AuthenticationFailed",)
# seconds after which a failing request is not retried (SKD_STORE_TIMEOUT overrides)
STORE_TIMEOUT = 60.0
# blocks in flight per reader (benchmarks/README.md: 4 hide most of 20 ms a request, 8 of 50)
READ_PARALLELISM = 8
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|SAS", re.IGNORECASE)


class StoreError(SkdError):
    """A cache that cannot be used as asked: str(e) is one line naming the folder and what to do."""


class StoreUnreachable(StoreError):
    """The object store did not answer (no connection, a timeout): what was written stays, so the
    command that met it continues where it stopped when rerun."""


@dataclass(frozen=True)
class ObjectPrefix:
    """A cache under `prefix` of `bucket`; str() is the URL to show (`root/prefix`, no secrets)."""

    display: str
    scheme: str
    bucket: str
    root: str  # scheme://bucket (or container@account.host)
    prefix: str = ""

    kind = "object store"
    read_parallelism = READ_PARALLELISM
    # zarrs fetches a partly read shard's index holding the GIL: read shards whole
    reads_whole_shards = True

    def __str__(self) -> str:
        return self.display

    @property
    def path(self) -> str:
        return self.display

    def absolute(self) -> ObjectPrefix:
        return self

    def name(self, key: str = "") -> str:
        """The URL of the object `key` (relative to the prefix), for messages."""
        return f"{self.display}/{key}" if key else self.display

    @cached_property
    def objects(self):
        """The obstore store rooted at the cache's prefix (keys are relative to it)."""
        return self._open(self.display)

    @cached_property
    def bucket_objects(self):
        """The obstore store of the whole bucket (the lease lives beside the prefix)."""
        return self._open(self.root)

    def _open(self, url: str):
        import obstore.store

        try:
            return obstore.store.from_url(url, **request_limits())
        except Exception as exc:  # obstore raises its own kinds for a bad configuration
            raise StoreError(
                f"{self}: the object store cannot be configured ({cause(exc)}): "
                "check the AWS_*, GOOGLE_* or AZURE_* environment variables"
            ) from None

    def zarr_store(self, *, read_only: bool):
        """A zarr ObjectStore over obstore (served by zarrs), with zarr's executor wide enough for
        requests."""
        import zarr.storage

        from skd.storage.zarr_internals import widen_zarr_thread_pool

        widen_zarr_thread_pool()
        return zarr.storage.ObjectStore(self.objects, read_only=read_only)

    def listing(self, under: str = "") -> dict[str, int]:
        """{key: size in bytes} of every object under the prefix (or under `under` inside it), keys
        relative to the prefix: a request per 1000 objects."""
        import obstore

        found: dict[str, int] = {}
        try:
            for batch in obstore.list(
                self.objects, prefix=under.strip("/") or None, chunk_size=1000
            ):
                found.update((meta["path"], int(meta["size"])) for meta in batch)
        except Exception as exc:
            raise self.error(exc) from None
        return found

    def inspect(self) -> dict[str, int]:
        """The listing of an existing cache, checked like a folder's files before zarr reads any
        object."""
        if not (listing := self.listing()):
            raise StoreError(
                f"cache {self} does not exist (no object under it): build it with `skd-cache build --out {self}`"
            )
        check_objects(self, listing)
        return listing

    def check_metadata(self) -> None:
        """The group's zarr.json, if there, is within zarr metadata's size (one HEAD; zarr reads it
        whole)."""
        try:
            size = self.probe("zarr.json")
        except FileNotFoundError:
            return
        if size > MAX_METADATA_BYTES:
            raise CacheError(
                rebuild(
                    f"cache {self}: zarr.json has {size} bytes, more than zarr metadata's {MAX_METADATA_BYTES}"
                )
            )

    def is_empty(self) -> bool:
        """True where the prefix holds no object (a cache there does not exist yet)."""
        import obstore

        try:
            return not any(len(batch) for batch in obstore.list(self.objects, chunk_size=1))
        except Exception as exc:
            raise self.error(exc) from None

    def probe(self, key: str) -> int:
        """The size of the object `key`; FileNotFoundError if it is gone, StoreError if the store
        cannot be asked."""
        import obstore

        try:
            return int(obstore.head(self.objects, key)["size"])
        except FileNotFoundError:
            raise
        except Exception as exc:  # no connection, refused credentials
            raise self.error(exc) from None

    def put(self, key: str, data: bytes) -> None:
        """Write a whole object in one PUT (atomic: readers see the old object or the new one, never
        a part)."""
        import obstore

        try:
            obstore.put(self.objects, key, data, use_multipart=False)
        except Exception as exc:
            raise self.error(exc, f"refused to write {key}") from None

    def remove_all(self) -> None:
        """Delete every object under the prefix (`--overwrite` of a cache; the caller checked it is
        one)."""
        import obstore

        keys = list(self.listing())
        try:
            for i in range(0, len(keys), 1000):
                obstore.delete(self.objects, keys[i : i + 1000])
        except Exception as exc:
            raise self.error(exc) from None

    def discard_partial_writes(self) -> None:
        """Nothing to do: a PUT leaves no partial object behind."""

    def new_home_problem(self, data) -> None:
        """None: a prefix can neither overlap a local dataset nor sit under a file."""

    def lock(self, ttl: float | None = None) -> Lease:
        """The build's lease: the object `<prefix>.lock` beside the prefix (a StoreError names its
        holder)."""
        if not self.prefix:
            raise StoreError(
                f"{self}: a cache needs a prefix of its own (s3://BUCKET/NAME), not a whole bucket"
            )
        return Lease(self.bucket_objects, self.prefix + ".lock", str(self), self.error, ttl)

    def error(self, exc: Exception, what: str = "cannot be reached") -> StoreError:
        """The one-line StoreError for a failed request: a missing bucket, refused credentials, no
        connection."""
        from obstore.exceptions import InvalidPathError, PermissionDeniedError, UnauthenticatedError

        code = _xml(str(exc), "Code") or ""
        if code in MISSING_BUCKET_CODES or (isinstance(exc, FileNotFoundError) and not code):
            return StoreError(
                f"{self}: bucket {self.bucket} does not exist ({self.scheme}): create it or check "
                "the URL and AWS_ENDPOINT_URL"
            )
        # a key with an empty, '.' or '..' part: object_store refuses it
        if isinstance(exc, InvalidPathError):
            return StoreError(
                rebuild(
                    f"{self}: an object has an empty, '.' or '..' part in its key (it would leave the prefix)"
                )
            )
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or code in ACCESS_CODES:
            return StoreError(
                f"{self}: access denied ({code or type(exc).__name__}): check the credentials in the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; "
                "GOOGLE_*, AZURE_*) and their permissions on the bucket"
            )
        return StoreUnreachable(
            f"{self}: the object store {what} ({cause(exc)}): check the URL, the endpoint "
            "(AWS_ENDPOINT_URL, AWS_ALLOW_HTTP) and the network"
        )


def store_failure(exc: BaseException) -> StoreError | None:
    """The one-line StoreError for a failed object-store request that surfaced through zarr or zarrs
    rather than through an ObjectPrefix method (a plan, sample or metadata read, a completion flag
    written), or None where `exc` is no such failure. What a build or training wrote before it
    stays: the rerun resumes."""
    from obstore.exceptions import BaseError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BaseError) or (
            isinstance(exc, RuntimeError) and "object_store" in str(exc)
        ):
            return StoreError(
                f"a request to the object store failed ({cause(exc)}): check the connection and the endpoint "
                "(AWS_ENDPOINT_URL); what was written is kept"
            )
        exc = exc.__cause__ or exc.__context__
    return None


def request_limits() -> dict:
    """obstore's retry options: no retry starts after SKD_STORE_TIMEOUT seconds (default
    STORE_TIMEOUT), so an endpoint that accepts connections and never answers is one line after that
    and one request's own timeout (object_store's default: 30 s); object_store alone retries for 3
    minutes. (Client options are left to the environment: passing any replaces those it reads,
    AWS_ALLOW_HTTP among them.)"""
    from datetime import timedelta

    seconds = float(os.environ.get("SKD_STORE_TIMEOUT") or STORE_TIMEOUT)
    return {"retry_config": {"max_retries": 3, "retry_timeout": timedelta(seconds=seconds)}}


def check_objects(location: ObjectPrefix, listing: dict[str, int]) -> None:
    """The listing-based counterpart of `files.check_files`: objects cannot be FIFOs or symlinks,
    so what is checked is that every key stays inside the prefix (no empty, '.' or '..' part, no
    backslash, no absolute key), that no object is both a file and a folder of others, and that no
    zarr.json is over MAX_METADATA_BYTES (zarr reads it whole)."""
    for key, size in listing.items():
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise CacheError(
                rebuild(f"cache {location}: object {key!r} leaves the prefix or is not a plain key")
            )
        if parts[-1] == "zarr.json" and size > MAX_METADATA_BYTES:
            raise CacheError(
                rebuild(
                    f"cache {location}: {key} has {size} bytes, more than zarr metadata's {MAX_METADATA_BYTES}"
                )
            )
    folders = {key.rsplit("/", 1)[0] for key in listing if "/" in key}
    for folder in sorted(folders):
        while folder:
            if folder in listing:
                raise CacheError(
                    rebuild(f"cache {location}: {folder} is an object and a folder of others")
                )
            folder = folder.rsplit("/", 1)[0] if "/" in folder else ""


def scrub(text: str) -> str:
    """`text` with the value of every credential-like environment variable (AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AZURE_STORAGE_ACCOUNT_KEY, ...) masked: messages quote what the store
    said."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def cause(exc: Exception) -> str:
    """A short, one-line cause of an obstore error: the service's error code and the exception's
    kind, or the first line of the message, cut short, credentials masked (they are sent in headers,
    not in messages)."""
    text = scrub(" ".join(str(exc).split()))
    code = _xml(text, "Code")
    if code:
        return f"{type(exc).__name__} {code}"
    for marker in (
        "Connection refused",
        "dns error",
        "timed out",
        "tcp connect error",
        "certificate",
    ):
        if marker.lower() in text.lower():
            return marker
    return (text[:150] + "...") if len(text) > 150 else (text or type(exc).__name__)


def _xml(text: str, tag: str) -> str | None:
    """The value of `<tag>` in the XML error body an object store answered with (obstore quotes
    it)."""
    found = re.search(f"<{tag}>([^<]{{1,80}})</{tag}>", text)
    return found.group(1) if found else None
