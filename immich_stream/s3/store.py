"""The S3 backend: a `Store` moves bytes to and from one bucket. Every request goes
through the one retry wrapper (retry.py); the data path (PutObject, UploadPart, GetObject)
goes the direct path (direct.py) where it can, everything else through aiobotocore.

Integrity: every PUT and part carries the --checksum header the server verifies
(checksums.py). botocore's default CRC32 trailers (botocore >= 1.36) are switched off on
purpose: several S3-compatible servers reject aws-chunked bodies. The Store also owns
server-side encryption (SSE-S3/KMS, SSE-C headers and the check of the server's answer),
--limit-upload/--limit-download, and what the hang and stall watchdogs read (requests in
flight, the last answer, bodies on their way). It reads its own StoreOptions, never the
Settings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import hashlib
import http.client
import logging
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from immich_stream.errors import DeleteDenied, StoreError
from immich_stream.s3.checksums import (
    CHECK_ALGORITHMS,
    CHECK_HEADERS,
    CHECK_PARAMS,
    CHUNK_SHARED,
    MIB,
    SMALL_OBJECT,
    check_value,
    md5_b64,
)
from immich_stream.s3.classify import REDIRECT_CODES, is_transient, short, store_error
from immich_stream.s3.direct import Direct, range_header
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.pacing import RateLimit
from immich_stream.s3.patches import Body, Pace, drop_expect_header, install_patches, unacked_bytes
from immich_stream.s3.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Every Store open in this process: the CLI's S3-hang watchdog looks at all of them.
OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


@dataclass
class ObjectInfo:
    key: str
    size: int
    last_modified: Any = None
    storage_class: str | None = None  # as listed (None: the server did not say, i.e. STANDARD)


@dataclass
class HeadInfo:
    size: int
    storage_class: str  # STANDARD when the server sends no x-amz-storage-class
    restore: str | None  # x-amz-restore: None (no thaw requested), 'ongoing-request="true"' ...


# What S3 answers a key that may not delete (AWS and moto: AccessDenied, per key of a DeleteObjects).
DENIED = ("AccessDenied", "AllAccessDisabled")
APPEND_ONLY_WARNING = (
    "this S3 key cannot delete: continuing append-only (what this run would delete is left for `prune` "
    "run elsewhere with a key that can delete; set append_only to skip the attempt)"
)

# Classes whose objects must be thawed (RestoreObject) before a GET; GLACIER_IR need not.
ARCHIVED_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


class Store:
    """An S3 bucket. Use as `async with Store(StoreOptions.from_settings(settings)) as store:`."""

    def __init__(self, options: StoreOptions) -> None:
        self.options = options
        self.bucket = options.bucket
        self._client: Any = None
        self._cm: Any = None
        self._direct: Direct | None = None
        self.checksum = options.checksum
        self.last_activity = time.monotonic()  # the stall watchdog reads this: see touch()
        self.last_answer = time.monotonic()  # any answer or downloaded byte: see hung()
        self._sending: set[Pace] = set()  # bodies of backup data on their way (check_moving)
        self._reading = 0  # downloads with a body open
        self._retry = Retry(options.retries, options.jobs, self._error, self._answered)
        # SSE-C: the key rides on every request for an object's bytes (PUT, parts, GET,
        # HEAD); never logged, never in an error message.
        self._sse_c_headers: dict[str, str] = {}
        self._sse_c_kw: dict[str, Any] = {}
        key = options.sse_c_key
        if key is not None:
            self._sse_c_headers = {
                "x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
                "x-amz-server-side-encryption-customer-key-MD5": md5_b64(key),
            }
            self._sse_c_kw = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
        self._sse_unconfirmed = False  # warned once that the server did not confirm SSE
        # --limit-upload / --limit-download: one bucket per direction for every request
        self.upload_limit = RateLimit.mib_per_s(options.limit_upload)
        self.download_limit = RateLimit.mib_per_s(options.limit_download)
        # Object Lock: the (mode, retain-until) an object written at key gets (repository/retention.py)
        self.retention_for: Callable[[str], tuple[str, dt.datetime] | None] = lambda key: None
        # --append-only, or the first DeleteDenied of a discard(): no delete is sent any more
        self.append_only = False

    async def __aenter__(self) -> Store:
        import aioboto3
        from aiobotocore.config import AioConfig

        install_patches()
        s = self.options
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if s.path_style else "auto"},
            retries={"max_attempts": 1, "mode": "standard"},  # retries are ours: retry.py
            max_pool_connections=s.jobs + 4,
            connect_timeout=10,
            read_timeout=s.read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = s.region or ("us-east-1" if s.endpoint_url else None)
        verify: bool | str = str(s.ca_bundle) if s.ca_bundle else s.verify_tls
        keys = s.credentials
        session = (
            aioboto3.Session(aws_access_key_id=keys[0], aws_secret_access_key=keys[1]) if keys else aioboto3.Session()
        )
        self._cm = session.client("s3", endpoint_url=s.endpoint_url, region_name=region, config=config, verify=verify)
        self._client = await self._cm.__aenter__()
        self._client.meta.events.register_last("before-call.s3", drop_expect_header)
        if not s.botocore_only:  # botocore only: the slow path, for comparison
            self._direct = await Direct.open(self._client, self.bucket, s)
            if self._direct is not None:
                self._direct.sse_c = self._sse_c_headers
        OPEN_STORES.add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        OPEN_STORES.discard(self)
        if self._direct is not None:
            await self._direct.session.close()
            if self._direct.fetcher is not None:
                await asyncio.to_thread(self._direct.fetcher.close)
            self._direct = None
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)
            self._cm = self._client = None

    @property
    def retries(self) -> int:
        return self._retry.retries

    def oldest_request(self) -> tuple[str, float] | None:
        """(what, seconds) of the request waiting longest for its answer, if any."""
        return self._retry.oldest_request()

    def _answered(self) -> None:
        self.last_answer = time.monotonic()

    def _error(self, what: str, exc: BaseException) -> StoreError:
        return store_error(
            what,
            exc,
            endpoint=self.options.endpoint_url,
            bucket=self.bucket,
            sse_c=bool(self._sse_c_headers),
            retries=self.retries,
        )

    def hung(self, stall: float) -> str | None:
        """What S3 is not answering, when requests or downloads are waiting and nothing
        at all came back for `stall` seconds (timeouts and retries included)."""
        self.check_moving()
        quiet = time.monotonic() - self.last_answer
        if (not self._retry.inflight and not self._reading) or quiet <= stall:
            return None
        oldest = self.oldest_request()
        what = f" ({oldest[0]})" if oldest else ""
        return f"S3 at {self.options.endpoint_url or 'AWS'} answered nothing for {quiet:.0f} s{what}"

    def touch(self) -> None:
        """Progress: bytes acknowledged by S3, files walked, dump bytes received."""
        self.last_activity = time.monotonic()

    def _pace(self) -> Pace:
        """How a body of backup data is sent (at --limit-upload's rate, if set); watched by
        check_moving until _sent_all."""
        pace = Pace(self.upload_limit, self._sent)
        self._sending.add(pace)
        return pace

    def _sent_all(self, pace: Pace | None) -> None:
        if pace is not None:
            self._sending.discard(pace)
            pace.sock = None

    def _sent(self, n: int) -> None:
        # Bytes moving are progress and an answer, however slowly they go (a slow uplink,
        # --limit-upload): a frozen server stops taking them.
        self.last_answer = self.last_activity = time.monotonic()

    def check_moving(self) -> None:
        """Progress of bodies on their way: the server acknowledged bytes of a body further
        than any attempt of it had before (what was written less what the send queue still
        holds). Called by the watchdogs before they judge."""
        moved = False
        for pace in list(self._sending):
            if pace.sock is None:
                continue
            unacked = unacked_bytes(pace.sock)
            if unacked is None or unacked < 0:
                continue
            acked = pace.written - unacked
            if acked > pace.acked:
                moved = True
                pace.acked = acked
        if moved:
            self._sent(0)

    # -- objects ----------------------------------------------------------------------------

    async def _direct_or(self, direct: Callable[[Direct], Awaitable[T]], slow: Callable[[], Awaitable[T]]) -> T:
        """The request through the direct path, or through aiobotocore where that one cannot
        go (and, after a region redirect, for every later request)."""
        if self._direct is None:
            return await slow()
        try:
            return await direct(self._direct)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in REDIRECT_CODES:
                raise
            log.debug("S3 answered %s: requests go through botocore from now on", short(exc))
            self._direct = None
            return await slow()

    async def hashes(self, data: bytes, check: str | None, sha256: str | None) -> tuple[str, str]:
        """(checksum header value, sha256 hex) of data, computing what the caller did not
        give; in a worker thread unless data is small (a part of the dump is megabytes)."""
        if check is not None and sha256 is not None:
            return check, sha256

        def compute() -> tuple[str, str]:
            sha = sha256 or hashlib.sha256(data).hexdigest()
            return check or check_value(self.checksum, data, sha), sha

        return compute() if len(data) <= 65536 else await asyncio.to_thread(compute)

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str | None = None,
        check: str | None = None,
        sha256: str | None = None,
        progress: bool = False,
        storage_class: str | None = None,
    ) -> None:
        """One PUT with the --checksum header; its value (base64) and the sha256 (hex) of data
        may be given when already known (UNSIGNED-PAYLOAD as the sha256: not signed, see
        checksums.sealed_hashes). `progress`: the bytes are backup data, and their
        acknowledgement is progress. `storage_class`: None or STANDARD send no header."""
        value, wire_sha = await self.hashes(data, check, sha256)
        headers = {CHECK_HEADERS[self.checksum]: value}
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, CHECK_PARAMS[self.checksum]: value}
        if content_type:
            kw["ContentType"] = headers["Content-Type"] = content_type
        extra_headers, extra_kw = self._write_options(storage_class, key)
        headers.update(extra_headers)
        kw.update(extra_kw)
        pace = self._pace() if progress else None  # locks and probes are neither held back nor progress

        async def slow() -> dict[str, str]:
            resp = await self._client.put_object(Body=Body(data, wire_sha, pace), **kw)
            return dict(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}))

        try:
            answer = await self._retry.call(
                f"upload {key}",
                lambda: self._direct_or(lambda d: d.put("PutObject", key, data, headers, wire_sha, pace=pace), slow),
                small=len(data) <= SMALL_OBJECT,
            )
        finally:
            self._sent_all(pace)
        self._check_sse(key, answer)
        if progress:
            self.touch()

    def _write_options(self, storage_class: str | None, key: str) -> tuple[dict[str, str], dict[str, Any]]:
        """(headers, botocore parameters) a PutObject or CreateMultipartUpload carries: its
        storage class (the caller's: file data only), server-side encryption, its Object
        Lock retention (retention_for)."""
        headers: dict[str, str] = {}
        kw: dict[str, Any] = {}
        if (locked := self.retention_for(key)) is not None:
            headers["x-amz-object-lock-mode"] = kw["ObjectLockMode"] = locked[0]
            kw["ObjectLockRetainUntilDate"] = until = locked[1]
            headers["x-amz-object-lock-retain-until-date"] = until.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        if storage_class and storage_class != "STANDARD":
            headers["x-amz-storage-class"] = kw["StorageClass"] = storage_class
        if self.options.sse:
            headers["x-amz-server-side-encryption"] = kw["ServerSideEncryption"] = self.options.sse
            if self.options.sse_kms_key_id:
                headers["x-amz-server-side-encryption-aws-kms-key-id"] = kw["SSEKMSKeyId"] = self.options.sse_kms_key_id
        headers.update(self._sse_c_headers)
        kw.update(self._sse_c_kw)
        return headers, kw

    def _check_sse(self, key: str, answer: dict[str, str], silent_ok: bool = False) -> None:
        """The server's answer to a write names the encryption it applied: a different one
        fails the run; none at all (a server that does not say) is warned about once, unless
        `silent_ok` (SeaweedFS does not say it when a multipart upload starts)."""
        if self.options.sse:
            name, wanted = "x-amz-server-side-encryption", self.options.sse
        elif self._sse_c_headers:
            name, wanted = "x-amz-server-side-encryption-customer-algorithm", "AES256"
        else:
            return
        got = {k.lower(): v for k, v in answer.items()}.get(name)
        if got is None:
            if not self._sse_unconfirmed and not silent_ok:
                self._sse_unconfirmed = True
                log.warning(
                    "S3 at %s did not confirm server-side encryption (no %s in its answer): check that it supports it",
                    self.options.endpoint_url or "AWS",
                    name,
                )
        elif got != wanted:
            raise StoreError(
                f"upload {key}: S3 applied server-side encryption {got!r}, not the {wanted!r} asked for: "
                "check the bucket's default encryption and --sse"
            )

    async def download(self, key: str, sink: Callable[[memoryview], None], size_hint: int, small: bool = False) -> None:
        """The object's bytes into sink, in order, each exactly once, called in a worker
        thread (see direct.Fetcher); a broken connection resumes where it stopped (Range). sink
        must not keep the view it is given. When this returns or raises, sink is done being
        called. Errors sink raises are raised as they are. `size_hint`: the expected size."""
        d = self._direct
        if d is None or d.fetcher is None:
            async for chunk in self.iter_object(key, CHUNK_SHARED, small=small):
                await asyncio.to_thread(sink, memoryview(chunk))
            return
        fetcher = d.fetcher
        offset = 0

        def received(n: int) -> None:
            nonlocal offset
            offset += n
            # bytes moving: progress and an answer (plain stores: read by the watchdogs in the loop)
            self.last_answer = self.last_activity = time.monotonic()

        async def attempt() -> None:
            url, headers = await d.signed_get(key, offset)
            current: list[http.client.HTTPConnection] = []
            stop = threading.Event()
            job = fetcher.pool.submit(
                fetcher.fetch,
                url,
                headers,
                max(size_hint - offset, 0),
                sink,
                received,
                current,
                stop,
                self.download_limit,
            )
            self._reading += 1
            try:
                await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                # The thread cannot be cancelled: stop it, and break a receive that waits
                # for a frozen server, then wait for it, so that sink is not called after.
                stop.set()
                for conn in list(current):
                    with contextlib.suppress(OSError, AttributeError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(job)
                raise
            finally:
                self._reading -= 1

        try:
            await self._retry.call(f"download {key}", attempt, small=small)
        except StoreError as exc:
            cause = exc.__cause__
            if (
                offset == 0
                and isinstance(cause, ClientError)
                and cause.response.get("Error", {}).get("Code") in REDIRECT_CODES
            ):
                log.debug("S3 answered %s: requests go through botocore from now on", short(cause))
                self._direct = None
                await self.download(key, sink, size_hint, small)
                return
            raise

    async def get(self, key: str) -> bytes:
        """A small object whole (a lock, config.json, snapshot.json): an answer, but not
        progress for the stall watchdog (a lock's refresh reads others' locks every few
        seconds, which must not keep a backup with a hung dump alive)."""
        chunks = [c async for c in self.iter_object(key, progress=False)]
        return b"".join(chunks)

    async def iter_object(
        self,
        key: str,
        chunk_size: int = MIB,
        small: bool = False,
        progress: bool = True,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncIterator[bytes]:
        """An object's bytes in chunks, as stored; a broken connection resumes where it
        stopped (Range). `small`: the object is at most SMALL_OBJECT bytes (see retry.py).
        `progress`: its bytes count as progress for the stall watchdog (they always count as
        an answer). `start`, `end`: only the bytes [start, end) (a blob in a pack)."""
        if end is not None and end <= start:
            return
        offset = start
        attempt = 0
        limit = self.download_limit
        if limit is not None:
            chunk_size = min(chunk_size, limit.chunk)
        while end is None or offset < end:

            async def open_body(offset: int = offset) -> Any:
                async def slow() -> Any:
                    kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._sse_c_kw, **self._version(key)}
                    if offset or end is not None:
                        kw["Range"] = range_header(offset, end)
                    return (await self._client.get_object(**kw))["Body"]

                return await self._direct_or(lambda d: d.get(key, offset, end), slow)

            body = await self._retry.call(f"download {key}", open_body, small=small)
            self._reading += 1
            try:
                while True:
                    try:
                        chunk = await body.read(chunk_size)
                    except Exception as exc:
                        attempt += 1
                        if not is_transient(exc) or attempt >= self.retries:
                            raise self._error(f"download {key}", exc) from exc
                        log.debug("download %s broke at %d (%s), resuming", key, offset, short(exc))
                        await asyncio.sleep(min(0.25 * 2**attempt, 10))
                        break
                    if not chunk:
                        return
                    if end is not None and offset + len(chunk) > end:
                        chunk = chunk[: max(end - offset, 0)]  # never more than asked for
                        if not chunk:
                            return
                    if limit is not None:
                        await limit.take(len(chunk))
                    self.last_answer = time.monotonic()  # bytes moving
                    if progress:
                        self.last_activity = self.last_answer
                    offset += len(chunk)
                    yield chunk
            finally:
                self._reading -= 1
                body.close()

    def _version(self, key: str) -> dict[str, str]:
        """A read's VersionId: none here (the current version); asof.py names one."""
        return {}

    async def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        info = await self.head_info(key)
        return None if info is None else info.size

    async def head_info(self, key: str) -> HeadInfo | None:
        """The object's size, storage class and thaw state, or None when it does not exist."""

        async def go() -> HeadInfo | None:
            try:
                kw = {"Bucket": self.bucket, "Key": key, **self._sse_c_kw, **self._version(key)}
                resp = await self._client.head_object(**kw)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return HeadInfo(int(resp["ContentLength"]), resp.get("StorageClass") or "STANDARD", resp.get("Restore"))

        return await self._retry.call(f"look up {key}", go)

    async def copy_object(self, source_bucket: str, source_key: str, key: str, storage_class: str | None) -> None:
        """A server-side copy (CopyObject) of source_bucket/source_key, on this Store's endpoint
        with its credentials, to key: the bytes never pass through this process (`copy`)."""
        kw: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "CopySource": {"Bucket": source_bucket, "Key": source_key},
            **self._write_options(storage_class, key)[1],
        }
        if self._sse_c_kw:
            kw["CopySourceSSECustomerAlgorithm"] = "AES256"
            kw["CopySourceSSECustomerKey"] = self._sse_c_kw["SSECustomerKey"]
            kw.update(self._sse_c_kw)
        await self._retry.call(f"copy {source_key} to {key}", lambda: self._client.copy_object(**kw))
        self.touch()

    async def restore_object(self, key: str, days: int, tier: str) -> str:
        """Ask S3 to thaw an archived object for `days`: "requested" (202), "thawed" (200: a
        thawed copy is there already, its expiry extended) or "in progress" (409
        RestoreAlreadyInProgress: asked for before, not an error)."""

        async def go() -> str:
            try:
                resp = await self._client.restore_object(
                    Bucket=self.bucket,
                    Key=key,
                    RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": tier}},
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "RestoreAlreadyInProgress":
                    return "in progress"
                raise
            return "thawed" if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 else "requested"

        return await self._retry.call(f"thaw {key}", go, small=True)

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            resp = await self._retry.call(f"list {prefix}", functools.partial(self._client.list_objects_v2, **kw))
            for item in resp.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item["Size"]), item.get("LastModified"), item.get("StorageClass"))
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    async def delete(self, keys: list[str]) -> None:
        """Delete keys, 1,000 per request."""
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}

            try:
                resp = await self._retry.call(
                    "delete objects", functools.partial(self._client.delete_objects, Bucket=self.bucket, Delete=batch)
                )
            except StoreError as exc:
                if exc.code in DENIED:  # the whole request refused
                    raise _denied(exc.code) from exc
                raise
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                if denied := [e for e in errors if e.get("Code") in DENIED]:  # AWS and moto refuse each key
                    raise _denied(str(denied[0].get("Code")))
                raise StoreError(
                    f"could not delete {len(errors)} objects, first {first.get('Key')}: {first.get('Message')}"
                )

    async def discard(self, keys: list[str]) -> bool:
        """Delete what a backup no longer needs (a probe, a released lock, a committed run's
        journal), unless this key cannot delete: append-only (--append-only, or detected
        here at the first DeleteDenied, said once), the keys are left for `prune` run with a
        key that can. True when they were deleted."""
        if self.append_only or not keys:
            return not keys
        try:
            await self.delete(keys)
        except DeleteDenied:
            if not self.append_only:
                self.append_only = True
                log.warning(APPEND_ONLY_WARNING)
            return False
        return True

    async def can_delete(self, key: str) -> bool:
        """Whether this key may delete: `key` (a probe of a fixed name: what a key that may
        not delete leaves stays one object) written, then deleted. A key that may not
        delete makes this store append-only, silently (the caller says what it means)."""
        await self.put(key, b"immich-stream delete probe\n")
        try:
            await self.delete([key])
        except DeleteDenied:
            self.append_only = True
            return False
        return True

    async def probe_checksum_sha256(self, key: str, data: bytes, value: str) -> str | None:
        """doctor's probe, a request the tool itself never sends: one PutObject of data with
        this x-amz-checksum-sha256 (a wrong one), through botocore, not retried. The S3 error
        code when the server refused it, None when it stored the object."""
        try:
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=value)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code", "?"))
        return None

    # -- multipart ----------------------------------------------------------------------------

    async def create_multipart(self, key: str, storage_class: str | None = None) -> str:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if self.checksum in CHECK_ALGORITHMS:  # AWS wants the parts' algorithm declared up front
            kw["ChecksumAlgorithm"] = CHECK_ALGORITHMS[self.checksum]
        kw.update(self._write_options(storage_class, key)[1])
        resp = await self._retry.call(f"start upload of {key}", lambda: self._client.create_multipart_upload(**kw))
        self._check_sse(key, resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}), silent_ok=True)
        return str(resp["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes, check: str | None = None, sha256: str | None = None
    ) -> tuple[str, str]:
        """(ETag, the part's checksum value): completing the upload names both."""
        value, sha256 = await self.hashes(data, check, sha256)
        param = CHECK_PARAMS[self.checksum]
        query = f"?partNumber={number}&uploadId={urllib.parse.quote(upload_id, safe='~')}"

        pace = self._pace()

        async def direct(d: Direct) -> str:
            headers = {CHECK_HEADERS[self.checksum]: value, **self._sse_c_headers}
            answer = await d.put("UploadPart", key, data, headers, sha256, query, pace)
            return answer["etag"]

        async def slow() -> str:
            resp = await self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=Body(data, sha256, pace),
                **{param: value},
                **self._sse_c_kw,
            )
            return str(resp["ETag"])

        try:
            etag = await self._retry.call(f"upload part {number} of {key}", lambda: self._direct_or(direct, slow))
        finally:
            self._sent_all(pace)
        self.touch()  # parts carry backup data (files, the dump, manifests)
        return etag, value

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[str, str]]) -> None:
        """parts: (ETag, checksum value) of each part, in order."""
        param = CHECK_PARAMS[self.checksum]
        listed: list[dict[str, Any]] = []
        for i, (etag, value) in enumerate(parts):
            part: dict[str, Any] = {"PartNumber": i + 1, "ETag": etag}
            if self.checksum in CHECK_ALGORITHMS:
                part[param] = value
            listed.append(part)
        await self._retry.call(
            f"finish upload of {key}",
            lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}, **self._sse_c_kw
            ),
        )
        if (locked := self.retention_for(key)) is not None:  # moto drops CreateMultipartUpload's retention
            retain = {"Mode": locked[0], "RetainUntilDate": locked[1]}
            put = functools.partial(self._client.put_object_retention, Bucket=self.bucket, Key=key, Retention=retain)
            await self._retry.call(f"set the retention of {key}", put, small=True)
        self.touch()

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._retry.call(
            f"abort upload of {key}",
            lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
        )

    async def list_multipart(self, prefix: str) -> list[tuple[str, str, Any]]:
        """(key, upload id, initiated) of unfinished multipart uploads under prefix."""
        out: list[tuple[str, str, Any]] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            try:
                resp = await self._retry.call(
                    "list multipart uploads", functools.partial(self._client.list_multipart_uploads, **kw)
                )
            except StoreError as exc:
                # `rclone serve s3` keeps uploads in memory and answers NoSuchUpload to this
                # listing until one was started in the bucket (since it started): none.
                if exc.code == "NoSuchUpload":
                    return out
                raise
            out.extend((u["Key"], u["UploadId"], u.get("Initiated")) for u in resp.get("Uploads", []))
            if not resp.get("IsTruncated"):
                return out
            kw["KeyMarker"] = resp.get("NextKeyMarker")
            kw["UploadIdMarker"] = resp.get("NextUploadIdMarker")


def _denied(code: str) -> DeleteDenied:
    error = DeleteDenied(
        f"this S3 key cannot delete ({code} on DeleteObject): backups work append-only with it; "
        "run prune, unlock and doctor's cleanup with a key that can delete (README: keys that cannot delete)"
    )
    error.code = code
    return error
