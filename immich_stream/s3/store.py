"""The S3 backend: every request goes through one retry wrapper (`Store._call`).

Integrity: every PUT and part carries a checksum the server verifies: Content-MD5 by
default (understood everywhere), or x-amz-checksum-sha256 / -crc32c (`--checksum`), which
AWS, MinIO and SeaweedFS verify and which reuse the sha256 already computed for the manifest
(sha256) or cost far less CPU than MD5 (crc32c). botocore's default CRC32 trailers
(botocore >= 1.36) are switched off on purpose: several S3-compatible servers reject
aws-chunked bodies.

The data path (PutObject, UploadPart, GetObject) bypasses botocore's per-request machinery
(see _Direct); everything else goes through aiobotocore.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import fcntl
import functools
import hashlib
import http.client
import io
import logging
import os
import random
import socket
import ssl
import sys
import termios
import threading
import time
import urllib.parse
import urllib.request
import weakref
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import aiohttp.payload
import botocore.auth
import yarl
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError

from immich_stream import cleanup
from immich_stream.config import Settings, read_sse_c_key
from immich_stream.errors import CredentialsMissing, ObjectNotFound, StoreError
from immich_stream.repository.age import DecryptError, Sealing
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.pacing import RateLimit

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PARTS = 10_000
MIB = 1024 * 1024
SMALL_OBJECT = MIB  # a PUT this small may run SMALL_FACTOR times as many at once as --jobs
SMALL_FACTOR = 4

_TRANSIENT_CODES = {
    # Not RequestTimeTooSkewed: this machine's clock is off, and no retry sets it right.
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "OperationAborted",
    "503",
    "500",
    "502",
    "504",
    # The body arrived other than it was sent (the server checked Content-MD5): the bytes
    # in memory are fine, so sending them again is the cure.
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}
_TRANSIENT_BOTOCORE = (
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ConnectionError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProxyConnectionError",
)


class _Body(io.BytesIO):
    """A request body that aiohttp sends without copying, and botocore signs without
    hashing it again.

    botocore turns a bytes Body into io.BytesIO (which shares the bytes), and aiohttp's
    BytesIOPayload calls getbuffer(), which unshares it: a full copy of every part in
    flight, doubling memory. Bodies of this type are sent as the bytes they wrap.

    Over plain HTTP, SigV4 signs the payload's sha256, which botocore computes in the
    event loop's thread (a third of the loop's time in a profile of a 1.5 GiB backup).
    When the caller already has that hash (computed in a worker thread while reading),
    it rides along here and the signer uses it."""

    def __init__(self, data: bytes, sha256_hex: str | None = None, pace: _Pace | None = None) -> None:
        super().__init__(data)
        self.sha256_hex = sha256_hex
        self.pace = pace


@dataclass(eq=False)
class _Pace:
    """How one body of backup data is sent: slice by slice (through `limit`, --limit-upload,
    when set), `sent(n)` told of each slice the connection took. `sock` is the connection's
    socket while the body is on its way: the stall watchdog reads how much of what was
    written the server has yet to acknowledge (Store.check_moving), so a part that takes
    minutes on a slow uplink is progress all along, also for its last bytes, which sit in
    the kernel's send buffer after the last write."""

    limit: RateLimit | None
    sent: Callable[[int], None]
    sock: Any = None
    unacked: int = -1  # bytes in the socket's send queue at the last look (-1: not looked yet)


SLICE = MIB  # a body of backup data is written in slices this large (progress between them)


def _unacked(sock: Any) -> int | None:
    """Bytes written to a TCP socket that its peer has not acknowledged yet (Linux's
    SIOCOUTQ); None where that cannot be read."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError, AttributeError):
        return None
    return int.from_bytes(raw, sys.byteorder, signed=True)


class _S3SigV4(botocore.auth.S3SigV4Auth):  # type: ignore[misc]  # botocore has no type hints
    def payload(self, request: Any) -> str:
        body = request.body
        known = getattr(body, "sha256_hex", None)
        if known and not self._is_streaming_checksum_payload(request) and self._should_sha256_sign_payload(request):
            return str(known)
        return str(super().payload(request))


class _HeadersFirstPayload(aiohttp.payload.BytesPayload):
    """Send the headers, then the body object itself. aiohttp coalesces headers and body
    with b"".join() on Pythons before 3.12.9 (its writelines is unsafe there): one more
    full copy of every request body in flight. With a `pace` (backup data) the body goes
    out in slices (views: no copies), at --limit-upload's rate when set."""

    pace: _Pace | None = None

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:
            send_headers()
        value = self._value
        if content_length is not None and content_length < len(value):
            value = value[:content_length]
        pace = self.pace
        if pace is None:
            await writer.write(value)
            return
        transport = getattr(writer, "transport", None)
        pace.sock = transport.get_extra_info("socket") if transport is not None else None
        pace.unacked = -1
        view = memoryview(value)
        step = pace.limit.chunk if pace.limit is not None else SLICE
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            if pace.limit is not None:
                await pace.limit.take(len(piece))
            await writer.write(piece)
            pace.sent(len(piece))

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)


def _body_payload(value: _Body, *args: Any, **kwargs: Any) -> aiohttp.payload.Payload:
    if value.tell() == 0:
        # getvalue() of a BytesIO made from bytes returns those very bytes
        payload = _HeadersFirstPayload(value.getvalue(), *args, **kwargs)
        payload.pace = value.pace
        return payload
    return aiohttp.payload.BytesIOPayload(value, *args, **kwargs)


_installed = False


def install_patches() -> None:
    """Process-wide changes to botocore and aiohttp, made once, by the first Store opened
    (not at import). Each only changes anything for a _Body: every other request is
    signed and sent exactly as botocore and aiohttp would."""
    global _installed
    if _installed:
        return
    botocore.auth.AUTH_TYPE_MAPS["s3v4"] = _S3SigV4
    # A factory is accepted at run time although the hints say a Payload class.
    aiohttp.payload.PAYLOAD_REGISTRY.register(_body_payload, _Body, order=aiohttp.payload.Order.try_first)  # type: ignore[arg-type]
    _installed = True


def _drop_expect_header(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for `Expect: 100-continue` on every PUT with a file-like body; aiohttp
    then waits for the server's 100 Continue with no timeout at all. A server that never
    sends it (seen with rclone, about one run in ten of the bench) hung the backup. The
    preflight already proved the credentials, which is what 100-continue would save a
    body's bandwidth for."""
    params.get("headers", {}).pop("Expect", None)


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --checksum: the header each choice sends, and the botocore parameter that sends it.
CHECK_HEADERS = {"md5": "Content-MD5", "sha256": "x-amz-checksum-sha256", "crc32c": "x-amz-checksum-crc32c"}
_CHECK_PARAMS = {"md5": "ContentMD5", "sha256": "ChecksumSHA256", "crc32c": "ChecksumCRC32C"}
_CHECK_ALGORITHMS = {"sha256": "SHA256", "crc32c": "CRC32C"}


def check_value(kind: str, data: bytes, sha256_hex: str | None = None) -> str:
    """The base64 value of the `kind` checksum header for data (blocking: CPU-bound on large
    data). The sha256 a caller already has is reused, not computed again."""
    if kind == "md5":
        return md5_b64(data)
    if kind == "sha256":
        digest = bytes.fromhex(sha256_hex) if sha256_hex else hashlib.sha256(data).digest()
        return base64.b64encode(digest).decode()
    if kind == "crc32c":
        import crc32c  # the optional dependency: config checks it is installed

        return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
    raise ValueError(f"unknown checksum {kind!r}")


UNSIGNED = "UNSIGNED-PAYLOAD"


def sealed_hashes(checksum: str, data: bytes) -> tuple[str, str]:
    """(checksum header value, payload hash to sign) of an encrypted body. Its sha256 is not
    computed for the signature alone (UNSIGNED-PAYLOAD, a second pass over every byte): the
    server still verifies the checksum header, which is signed, and age authenticates every
    chunk, so a body changed on the way is refused on the way in or at the latest on the
    way out."""
    if checksum == "sha256":
        sha = hashlib.sha256(data).hexdigest()
        return check_value(checksum, data, sha), sha
    return check_value(checksum, data), UNSIGNED


def part_size_for(size: int, part_size: int) -> int:
    """The part size for a file of known size: at least part_size, and at most 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    needed = -(-needed // MIB) * MIB
    return max(part_size, needed)


PARTS_PER_STEP = 1000  # a stream's parts double in size every this many parts


def stream_part_size(part_number: int, part_size: int, max_part: int) -> int:
    """Part sizes for a stream of unknown length: double every 1,000 parts, up to
    max_part (half the memory budget: a part is held whole before it is sent)."""
    grown = part_size << min((part_number - 1) // PARTS_PER_STEP, 20)
    return max(part_size, min(grown, max_part))


def max_stream_size(part_size: int, max_part: int) -> int:
    """The largest stream (dump, manifest) that fits in 10,000 parts with these sizes."""
    return (
        sum(stream_part_size(n, part_size, max_part) for n in range(1, MAX_PARTS + 1, PARTS_PER_STEP)) * PARTS_PER_STEP
    )


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, BotoCoreError):
        return type(exc).__name__ in _TRANSIENT_BOTOCORE or any(
            c.__name__ in _TRANSIENT_BOTOCORE for c in type(exc).__mro__
        )
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Answers after which botocore would have followed a redirect to the bucket's region.
_REDIRECT_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "307", "TemporaryRedirect"}


class _DirectSigner(botocore.auth.S3SigV4Auth):  # type: ignore[misc]  # botocore has no type hints
    """botocore's S3 SigV4, with the payload's sha256 given (computed in a worker thread)."""

    def payload(self, request: Any) -> str:
        return str(request.context["payload_sha256"])


class _DirectBody:
    """A GET's body, read like botocore's StreamingBody."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._rest = b""

    async def read(self, n: int = -1) -> bytes:
        """The next bytes as received, up to n: aiohttp's read(n) waits for n bytes and
        joins them, readany() hands over whatever arrived (one chunk when the reader keeps
        up); a chunk larger than n is sliced."""
        chunk, self._rest = self._rest or await self._resp.content.readany(), b""
        if 0 <= n < len(chunk):
            chunk, self._rest = chunk[:n], chunk[n:]
        return chunk

    def close(self) -> None:
        self._resp.close()  # returns the connection when the body was read to its end


class _Direct:
    """PutObject, UploadPart and GetObject straight through aiohttp, signed with botocore's
    own SigV4 signer.

    A profile of 1,300 small PUTs through aiobotocore found its per-request machinery
    costing more than the request: the endpoint ruleset resolved again for every call
    (~0.8 ms), the event hooks (~1.1 ms), the user-agent string (~0.3 ms). Here the endpoint
    is resolved once per Store by botocore's own resolver, credentials come from the
    client's provider (refreshed as botocore refreshes them), and an error answer becomes
    the ClientError botocore would raise, so the retry wrapper and its classification apply
    unchanged. A region redirect (which botocore follows) switches the Store back to
    aiobotocore for good."""

    def __init__(
        self,
        client: Any,
        base: str,
        region: str,
        session: aiohttp.ClientSession,
        proxy: str | None,
        settings: Settings,
        sslctx: ssl.SSLContext | bool,
    ) -> None:
        self._client = client
        self._proxy = proxy
        self._base = base.rstrip("/")
        self._region = region
        self._creds = client._request_signer._credentials
        self.session = session
        self.fetcher = _Fetcher(base, sslctx, settings) if proxy is None else None
        self.sse_c: dict[str, str] = {}  # SSE-C headers every GET carries (set by Store)

    @classmethod
    async def open(cls, client: Any, bucket: str, settings: Settings) -> _Direct | None:
        """None when this client's setup is one the direct path does not cover."""
        if client._request_signer._credentials is None or not bucket:
            return None  # anonymous, or no bucket: botocore decides
        try:
            op = client.meta.service_model.operation_model("PutObject")
            ctx: dict[str, Any] = {}
            url, headers, _ = await client._resolve_endpoint_ruleset(op, {"Bucket": bucket, "Key": "k"}, ctx)
        except (AttributeError, TypeError, BotoCoreError) as exc:  # another aiobotocore: the slow path works
            log.debug("S3 requests go through botocore only: %s", _short(exc))
            return None
        if headers or ctx.get("auth_type") not in ("v4", "s3v4", None):
            return None  # S3 Express, or an endpoint that wants extra headers
        region = ctx.get("signing", {}).get("region") or client.meta.region_name or "us-east-1"
        sslctx: ssl.SSLContext | bool = True
        if settings.ca_bundle:
            sslctx = ssl.create_default_context(cafile=str(settings.ca_bundle))
        elif not settings.verify_tls:
            sslctx = False
        connector = aiohttp.TCPConnector(limit=settings.jobs + 4, ssl=sslctx, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=settings.read_timeout)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            trust_env=False,  # True reads ~/.netrc and the proxy variables again for every request
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        proxies = urllib.request.getproxies()  # botocore's rule: the environment's proxy, unless no_proxy
        scheme, host = urllib.parse.urlsplit(url).scheme, urllib.parse.urlsplit(url).hostname or ""
        proxy = proxies.get(scheme) if not urllib.request.proxy_bypass(host) else None
        return cls(client, url, region, session, proxy, settings, sslctx)

    def url(self, key: str) -> str:
        return f"{self._base}/{urllib.parse.quote(key, safe='/~')}"

    async def _signed(self, method: str, url: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        creds = await self._creds.get_frozen_credentials()
        request = AWSRequest(method=method, url=url, headers=headers)
        request.context["payload_sha256"] = payload_sha256
        _DirectSigner(creds, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    async def put(
        self,
        op: str,
        key: str,
        data: bytes,
        headers: dict[str, str],
        sha256_hex: str,
        query: str = "",
        pace: _Pace | None = None,
    ) -> dict[str, str]:
        """One PUT; returns the answer's headers (lowercase names)."""
        url = self.url(key) + query
        signed = await self._signed("PUT", url, headers, sha256_hex)
        async with self.session.put(
            yarl.URL(url, encoded=True), data=_Body(data, pace=pace), headers=signed, proxy=self._proxy
        ) as resp:
            body = await resp.read()
            if resp.status >= 300:
                raise _client_error(op, resp, body)
            return {k.lower(): v for k, v in resp.headers.items()}

    async def signed_get(self, key: str, offset: int) -> tuple[str, dict[str, str]]:
        url = self.url(key)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        headers.update(self.sse_c)
        return url, await self._signed("GET", url, headers, EMPTY_SHA256)

    async def get(self, key: str, offset: int) -> _DirectBody:
        url, signed = await self.signed_get(key, offset)
        resp = await self.session.get(yarl.URL(url, encoded=True), headers=signed, proxy=self._proxy)
        if resp.status >= 300:
            try:
                body = await resp.read()
            finally:
                resp.close()
            raise _client_error("GetObject", resp, body)
        return _DirectBody(resp)


def _client_error(op: str, resp: aiohttp.ClientResponse, body: bytes) -> ClientError:
    return _error_answer(op, resp.status, resp.reason or "", {k.lower(): v for k, v in resp.headers.items()}, body)


def _error_answer(op: str, status: int, reason: str, headers: dict[str, str], body: bytes) -> ClientError:
    """The ClientError botocore raises for this answer: the S3 error Code and Message from
    the XML body, or the status code as the Code when there is none."""
    code, message = str(status), reason
    if body:
        try:
            root = ElementTree.fromstring(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or message
        except ElementTree.ParseError:
            pass
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
        },
        op,
    )


class _Broken(ConnectionError):
    """The connection failed or broke during a threaded GET (transient: resumed)."""


class _SinkFailed(Exception):
    """The caller's sink raised: its error, not S3's (never retried, raised as it was)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Fetcher:
    """GET bodies read in worker threads over blocking keep-alive connections, straight
    into a reused buffer that the caller's sink consumes (hashes and writes) in the same
    thread.

    Through aiohttp every byte of a download passed through the event loop's one thread
    in 64 KiB pieces, copied twice (uvloop's read, the HTTP parser's body slice), then
    again into a batch for a worker thread: a restore used 2.2 CPU seconds of the loop
    per GiB, and on two cores shared with the S3 server (and anything else) the loop's
    thread was the limit. Here a thread receives (recv_into, the GIL released), hashes
    and writes 1 MiB at a time, and the loop only signs the request."""

    def __init__(self, base: str, sslctx: ssl.SSLContext | bool, settings: Settings) -> None:
        parts = urllib.parse.urlsplit(base)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        if sslctx is True:
            sslctx = ssl.create_default_context()
        elif sslctx is False:
            sslctx = ssl.create_default_context()
            sslctx.check_hostname = False
            sslctx.verify_mode = ssl.CERT_NONE
        self._ssl = sslctx
        self._timeout = settings.read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.jobs * SMALL_FACTOR, thread_name_prefix="s3-get")

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def fetch(
        self,
        url: str,
        headers: dict[str, str],
        size_hint: int,
        sink: Callable[[memoryview], None],
        received: Callable[[int], None],
        current: list[http.client.HTTPConnection],
        stop: threading.Event,
        limit: RateLimit | None = None,
    ) -> None:
        """GET url into sink (blocking: in a worker thread). `received(n)` after each piece;
        `current` holds the connection while in use, for the loop to shut down; `stop`
        ends the transfer between pieces; `limit` (--limit-download) paces the pieces."""
        target = urllib.parse.urlsplit(url)
        path = target.path + ("?" + target.query if target.query else "")
        conn = self._connection()
        current.append(conn)
        reusable = False
        big = size_hint > CHUNK_SHARED
        buf = self._buffer() if big else bytearray(max(size_hint, 1))
        try:
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                if resp.status >= 300:
                    body = resp.read()
                    reusable = not resp.will_close
                    answer = {k.lower(): v for k, v in resp.getheaders()}
                    raise _error_answer("GetObject", resp.status, resp.reason or "", answer, body)
            except (OSError, http.client.HTTPException) as exc:
                raise _Broken(f"{type(exc).__name__}: {exc}") from exc
            view = memoryview(buf)
            while not stop.is_set():
                piece = view if limit is None else view[: limit.chunk]
                if limit is not None and not limit.take_blocking(len(piece), stop):
                    break
                try:
                    n = resp.readinto(piece)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Broken(f"{type(exc).__name__}: {exc}") from exc
                if limit is not None:
                    limit.give_back(len(piece) - n)
                if not n:
                    if resp.length:  # http.client ends a body cut short quietly
                        raise _Broken(f"the connection closed with {resp.length} bytes of the body to come")
                    reusable = not resp.will_close
                    return
                try:
                    sink(view[:n])
                except BaseException as exc:
                    raise _SinkFailed(exc) from exc
                received(n)
            raise _Broken("stopped")
        finally:
            current.remove(conn)
            if big:
                with self._lock:
                    self._buffers.append(buf)
            if reusable:
                with self._lock:
                    self._idle.append(conn)
            else:
                conn.close()

    def _buffer(self) -> bytearray:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        return bytearray(CHUNK_SHARED)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        self._buffers.clear()


CHUNK_SHARED = MIB  # a larger download is read 1 MiB at a time into a reused buffer


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


# Classes whose objects must be thawed (RestoreObject) before a GET; GLACIER_IR need not.
ARCHIVED_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


class Store:
    """An S3 bucket. Use as `async with Store(settings) as store:`."""

    def __init__(self, settings: Settings, retries: int | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket or ""
        self.retries = retries or settings.retries
        self._client: Any = None
        self._cm: Any = None
        self._direct: _Direct | None = None
        self.checksum = settings.checksum
        # set by Repo for an encrypted repository: which keys are age files (see age.py)
        self.sealing: Sealing | None = None
        self.last_activity = time.monotonic()  # the stall watchdog reads this: see touch()
        self._inflight: dict[object, tuple[str, float]] = {}
        self.last_answer = time.monotonic()  # any answer or downloaded byte: see hung()
        self._sending: set[_Pace] = set()  # bodies of backup data on their way (check_moving)
        self._reading = 0  # downloads with a body open
        # every request, whoever sends it, counts against --jobs; a small PUT against a limit
        # SMALL_FACTOR times higher: its cost is the round trip, not bandwidth, and the byte
        # budget bounds its memory as it bounds every other buffer
        self._limit = asyncio.Semaphore(settings.jobs)
        self._small_limit = asyncio.Semaphore(settings.jobs * SMALL_FACTOR)
        # The storage class of an object about to be written, by its key (repo.Repo sets
        # it: only repo.py knows which keys are file data). None: no header (STANDARD).
        self.storage_class_for: Callable[[str], str | None] = lambda key: None
        # SSE-C: the key rides on every request for an object's bytes (PUT, parts, GET,
        # HEAD); never logged, never in an error message.
        self._sse_c_headers: dict[str, str] = {}
        self._sse_c_kw: dict[str, Any] = {}
        if settings.sse_c_key_file is not None:
            key = read_sse_c_key(settings.sse_c_key_file)
            self._sse_c_headers = {
                "x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
                "x-amz-server-side-encryption-customer-key-MD5": md5_b64(key),
            }
            self._sse_c_kw = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
        self._sse_unconfirmed = False  # warned once that the server did not confirm SSE
        # --limit-upload / --limit-download: one bucket per direction for every request
        self.upload_limit = RateLimit.mib_per_s(settings.limit_upload)
        self.download_limit = RateLimit.mib_per_s(settings.limit_download)

    async def __aenter__(self) -> Store:
        import aioboto3
        from aiobotocore.config import AioConfig

        install_patches()
        s = self.settings
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if s.path_style else "auto"},
            retries={"max_attempts": 1, "mode": "standard"},  # retries are ours, in _call
            max_pool_connections=s.jobs + 4,
            connect_timeout=10,
            read_timeout=s.read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = s.region or ("us-east-1" if s.endpoint_url else None)
        verify: bool | str = str(s.ca_bundle) if s.ca_bundle else s.verify_tls
        session = aioboto3.Session()
        self._cm = session.client("s3", endpoint_url=s.endpoint_url, region_name=region, config=config, verify=verify)
        self._client = await self._cm.__aenter__()
        self._client.meta.events.register_last("before-call.s3", _drop_expect_header)
        if os.environ.get("IMMICH_STREAM_BOTOCORE_ONLY", "") in ("", "0"):  # the slow path, for comparison
            self._direct = await _Direct.open(self._client, self.bucket, s)
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

    def oldest_request(self) -> tuple[str, float] | None:
        """(what, seconds) of the request waiting longest for its answer, if any."""
        if not self._inflight:
            return None
        what, since = min(self._inflight.values(), key=lambda v: v[1])
        return what, time.monotonic() - since

    def hung(self, stall: float) -> str | None:
        """What S3 is not answering, when requests or downloads are waiting and nothing
        at all came back for `stall` seconds (timeouts and retries included)."""
        self.check_moving()
        quiet = time.monotonic() - self.last_answer
        if (not self._inflight and not self._reading) or quiet <= stall:
            return None
        oldest = self.oldest_request()
        what = f" ({oldest[0]})" if oldest else ""
        return f"S3 at {self.settings.endpoint_url or 'AWS'} answered nothing for {quiet:.0f} s{what}"

    def touch(self) -> None:
        """Progress: bytes acknowledged by S3, files walked, dump bytes received."""
        self.last_activity = time.monotonic()

    def _pace(self) -> _Pace:
        """How a body of backup data is sent (at --limit-upload's rate, if set); watched by
        check_moving until _sent_all."""
        pace = _Pace(self.upload_limit, self._sent)
        self._sending.add(pace)
        return pace

    def _sent_all(self, pace: _Pace | None) -> None:
        if pace is not None:
            self._sending.discard(pace)
            pace.sock = None

    def _sent(self, n: int) -> None:
        # Bytes moving are progress and an answer, however slowly they go (a slow uplink,
        # --limit-upload): a frozen server stops taking them.
        self.last_answer = self.last_activity = time.monotonic()

    def check_moving(self) -> None:
        """Progress of bodies on their way: a send queue that shrank since the last look
        means the server acknowledged bytes. Called by the watchdogs before they judge."""
        moved = False
        for pace in list(self._sending):
            if pace.sock is None:
                continue
            unacked = _unacked(pace.sock)
            if unacked is None:
                continue
            if 0 <= unacked < pace.unacked:
                moved = True
            pace.unacked = unacked
        if moved:
            self._sent(0)

    # -- the one retry wrapper ------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], small: bool = False) -> T:
        delay = 0.25
        limit = self._small_limit if small else self._limit
        for attempt in range(1, self.retries + 1):
            token = object()
            try:
                async with limit:
                    self._inflight[token] = (what, time.monotonic())
                    try:
                        result = await fn()
                    finally:
                        del self._inflight[token]
                self.last_answer = time.monotonic()
                return result
            except _SinkFailed as exc:  # the caller's own error (e.g. its disk is full)
                raise exc.error from None
            except Exception as exc:  # classified below; non-transient errors are raised at once
                # Neither an error, a timeout nor a retry is progress; nor is an answer to a
                # small request (a lock refresh): callers touch() for bytes of data only.
                if not is_transient(exc) or attempt == self.retries:
                    error = self._error(what, exc)
                    if isinstance(exc, ClientError):
                        error.code = exc.response.get("Error", {}).get("Code")
                    raise error from exc
                wait = min(delay * 2 ** (attempt - 1), 20.0) * (0.5 + random.random())
                log.debug("%s failed (%s), retry %d/%d in %.1fs", what, _short(exc), attempt, self.retries - 1, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _error(self, what: str, exc: BaseException) -> StoreError:
        where = self.settings.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            # S3 refuses requests signed more than 15 minutes off its clock. A HEAD's 403 has
            # no body to say so, but the answer's Date header shows how far off we are.
            skew = None
            try:
                server = email.utils.parsedate_to_datetime(
                    exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date", "")
                )
                skew = time.time() - server.timestamp()
            except (TypeError, ValueError):
                pass
            if code == "RequestTimeTooSkewed" or (
                code in ("403", "AccessDenied", "SignatureDoesNotMatch") and skew is not None and abs(skew) > 15 * 60
            ):
                off = f" by {abs(skew) / 60:.0f} minutes" if skew is not None and abs(skew) > 60 else ""
                return StoreError(
                    f"{what}: S3 refused the request because this machine's clock is off{off} ({code}): check it "
                    "with `date -u`, and enable NTP (`timedatectl set-ntp true`)"
                )
            reading = what.startswith(("download", "look up"))
            if reading and code in ("InvalidRequest", "InvalidArgument", "400", "BadRequest"):
                if not self._sse_c_headers:
                    return StoreError(
                        f"{what}: S3 refused to serve it ({code}): it may be encrypted with SSE-C: give its key "
                        "with --sse-c-key-file"
                    )
                return StoreError(
                    f"{what}: S3 refused to serve it ({code}): it may not be SSE-C encrypted, or not with the key "
                    "in --sse-c-key-file"
                )
            if reading and self._sse_c_headers and code in ("AccessDenied", "403"):
                return StoreError(
                    f"{what}: S3 refused access ({code}): the key in --sse-c-key-file may not be the one the "
                    "object was written with (or the credentials lack permission)"
                )
            if code == "InvalidObjectState":
                return StoreError(
                    f"{what}: the object is archived (GLACIER/DEEP_ARCHIVE) and not thawed: restore, drill and "
                    "verify --read-data thaw what they read first; run one of them"
                )
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist on {where}: create it or fix S3_BUCKET")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"):
                return StoreError(
                    f"{what}: S3 refused access ({code}) on bucket {self.bucket!r}: check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and their permissions"
                )
            kind = ObjectNotFound if code in ("NoSuchKey", "404", "NotFound") else StoreError
            return kind(f"{what}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": "))
        if isinstance(exc, BotoCoreError) and type(exc).__name__ == "NoCredentialsError":
            return CredentialsMissing(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if is_transient(exc):
            return StoreError(
                f"{what}: cannot reach S3 at {where} after {self.retries} attempts ({_short(exc)}): "
                "check the endpoint URL and the network"
            )
        return StoreError(f"{what}: {_short(exc)}")

    # -- objects ----------------------------------------------------------------------------

    async def _direct_or(self, direct: Callable[[_Direct], Awaitable[T]], slow: Callable[[], Awaitable[T]]) -> T:
        """The request through the direct path, or through aiobotocore where that one cannot
        go (and, after a region redirect, for every later request)."""
        if self._direct is None:
            return await slow()
        try:
            return await direct(self._direct)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _REDIRECT_CODES:
                raise
            log.debug("S3 answered %s: requests go through botocore from now on", _short(exc))
            self._direct = None
            return await slow()

    def sealing_for(self, key: str) -> Sealing | None:
        """How the object at key is encrypted, or None when it is stored as it is."""
        s = self.sealing
        return s if s is not None and s.applies(key) else None

    def stored_size(self, key: str, size: int) -> int | None:
        """The bytes in the bucket of an object of `size` plain bytes written now; None when
        the object is stored as it is (its size is the plain size)."""
        s = self.sealing_for(key)
        return s.size(size) if s is not None else None

    async def _hashes(self, data: bytes, check: str | None, sha256: str | None) -> tuple[str, str]:
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
        sealed: bool = False,
    ) -> None:
        """One PUT with the --checksum header; its value (base64) and the sha256 (hex) of data
        may be given when already known. `progress`: the bytes are backup data, and their
        acknowledgement is progress. In an encrypted repository data is sealed first (check
        and sha256 then describe the plaintext and are not used), unless `sealed` says the
        caller did (check and sha256 are then the ciphertext's)."""
        sealing = None if sealed else self.sealing_for(key)
        if sealing is not None:
            plain = data

            def seal_and_hash() -> tuple[bytes, str, str]:
                out = sealing.seal(plain)
                return out, *sealed_hashes(self.checksum, out)

            data, value, wire_sha = seal_and_hash() if len(plain) <= 65536 else await asyncio.to_thread(seal_and_hash)
            del plain
        else:
            value, wire_sha = await self._hashes(data, check, sha256)
        headers = {CHECK_HEADERS[self.checksum]: value}
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, _CHECK_PARAMS[self.checksum]: value}
        if content_type:
            kw["ContentType"] = headers["Content-Type"] = content_type
        extra_headers, extra_kw = self._write_options(key)
        headers.update(extra_headers)
        kw.update(extra_kw)
        pace = self._pace() if progress else None  # locks and probes are neither held back nor progress

        async def slow() -> dict[str, str]:
            resp = await self._client.put_object(Body=_Body(data, wire_sha, pace), **kw)
            return dict(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}))

        try:
            answer = await self._call(
                f"upload {key}",
                lambda: self._direct_or(lambda d: d.put("PutObject", key, data, headers, wire_sha, pace=pace), slow),
                small=len(data) <= SMALL_OBJECT,
            )
        finally:
            self._sent_all(pace)
        self._check_sse(key, answer)
        if progress:
            self.touch()

    def _write_options(self, key: str) -> tuple[dict[str, str], dict[str, Any]]:
        """(headers, botocore parameters) a PutObject or CreateMultipartUpload of key carries:
        its storage class (file data only), server-side encryption."""
        headers: dict[str, str] = {}
        kw: dict[str, Any] = {}
        storage_class = self.storage_class_for(key)
        if storage_class and storage_class != "STANDARD":
            headers["x-amz-storage-class"] = kw["StorageClass"] = storage_class
        if self.settings.sse:
            headers["x-amz-server-side-encryption"] = kw["ServerSideEncryption"] = self.settings.sse
            if self.settings.sse_kms_key_id:
                headers["x-amz-server-side-encryption-aws-kms-key-id"] = kw["SSEKMSKeyId"] = (
                    self.settings.sse_kms_key_id
                )
        headers.update(self._sse_c_headers)
        kw.update(self._sse_c_kw)
        return headers, kw

    def _check_sse(self, key: str, answer: dict[str, str], silent_ok: bool = False) -> None:
        """The server's answer to a write names the encryption it applied: a different one
        fails the run; none at all (a server that does not say) is warned about once, unless
        `silent_ok` (SeaweedFS does not say it when a multipart upload starts)."""
        if self.settings.sse:
            name, wanted = "x-amz-server-side-encryption", self.settings.sse
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
                    self.settings.endpoint_url or "AWS",
                    name,
                )
        elif got != wanted:
            raise StoreError(
                f"upload {key}: S3 applied server-side encryption {got!r}, not the {wanted!r} asked for: "
                "check the bucket's default encryption and --sse"
            )

    async def download(self, key: str, sink: Callable[[memoryview], None], size_hint: int, small: bool = False) -> None:
        """The object's bytes into sink, in order, each exactly once, called in a worker
        thread (see _Fetcher); a broken connection resumes where it stopped (Range). sink
        must not keep the view it is given. When this returns or raises, sink is done being
        called. Errors sink raises are raised as they are. `size_hint`: the expected size
        (of the plaintext). An encrypted object is decrypted on the way: sink gets only
        authenticated plaintext, and a damaged object raises DecryptError."""
        sealing = self.sealing_for(key)
        if sealing is None:
            await self._download(key, sink, size_hint, small)
            return
        dec = sealing.decryptor()

        def opened(view: memoryview) -> None:
            plain = dec.feed_view(view)  # one write (and hash update) per piece received
            if plain:
                sink(plain)
            plain.release()

        def last() -> None:
            for piece in dec.finish():
                sink(memoryview(piece))

        try:
            await self._download(key, opened, sealing.size(size_hint), small)
            await asyncio.to_thread(last)
        except DecryptError as exc:
            raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None

    async def _download(self, key: str, sink: Callable[[memoryview], None], size_hint: int, small: bool) -> None:
        d = self._direct
        if d is None or d.fetcher is None:
            async for chunk in self.iter_raw(key, CHUNK_SHARED, small=small):
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
            await self._call(f"download {key}", attempt, small=small)
        except StoreError as exc:
            cause = exc.__cause__
            if (
                offset == 0
                and isinstance(cause, ClientError)
                and cause.response.get("Error", {}).get("Code") in _REDIRECT_CODES
            ):
                log.debug("S3 answered %s: requests go through botocore from now on", _short(cause))
                self._direct = None
                await self._download(key, sink, size_hint, small)
                return
            raise

    async def get(self, key: str) -> bytes:
        chunks = [c async for c in self.iter_object(key)]
        return b"".join(chunks)

    async def iter_object(self, key: str, chunk_size: int = MIB, small: bool = False) -> AsyncIterator[bytes]:
        """An object's bytes in chunks; a broken connection resumes where it stopped (Range).
        `small`: the object is at most SMALL_OBJECT bytes (see _call). An encrypted object's
        plaintext, authenticated chunk by chunk (DecryptError when it is damaged)."""
        sealing = self.sealing_for(key)
        if sealing is None:
            async for chunk in self.iter_raw(key, chunk_size, small):
                yield chunk
            return
        dec = sealing.decryptor()
        try:
            async for chunk in self.iter_raw(key, chunk_size, small):
                for piece in dec.feed(chunk) if len(chunk) <= 65536 else await asyncio.to_thread(dec.feed, chunk):
                    yield piece
            for piece in dec.finish():
                yield piece
        except DecryptError as exc:
            raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None

    async def iter_raw(self, key: str, chunk_size: int, small: bool = False) -> AsyncIterator[bytes]:
        """The object's bytes as stored (encrypted or not)."""
        offset = 0
        attempt = 0
        limit = self.download_limit
        if limit is not None:
            chunk_size = min(chunk_size, limit.chunk)
        while True:

            async def open_body(offset: int = offset) -> Any:
                async def slow() -> Any:
                    kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._sse_c_kw}
                    if offset:
                        kw["Range"] = f"bytes={offset}-"
                    return (await self._client.get_object(**kw))["Body"]

                return await self._direct_or(lambda d: d.get(key, offset), slow)

            body = await self._call(f"download {key}", open_body, small=small)
            self._reading += 1
            try:
                while True:
                    try:
                        chunk = await body.read(chunk_size)
                    except Exception as exc:
                        attempt += 1
                        if not is_transient(exc) or attempt >= self.retries:
                            raise self._error(f"download {key}", exc) from exc
                        log.debug("download %s broke at %d (%s), resuming", key, offset, _short(exc))
                        await asyncio.sleep(min(0.25 * 2**attempt, 10))
                        break
                    if not chunk:
                        return
                    if limit is not None:
                        await limit.take(len(chunk))
                    self.last_answer = self.last_activity = time.monotonic()  # bytes moving
                    offset += len(chunk)
                    yield chunk
            finally:
                self._reading -= 1
                body.close()

    async def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        info = await self.head_info(key)
        return None if info is None else info.size

    async def head_info(self, key: str) -> HeadInfo | None:
        """The object's size, storage class and thaw state, or None when it does not exist."""

        async def go() -> HeadInfo | None:
            try:
                resp = await self._client.head_object(Bucket=self.bucket, Key=key, **self._sse_c_kw)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return HeadInfo(int(resp["ContentLength"]), resp.get("StorageClass") or "STANDARD", resp.get("Restore"))

        return await self._call(f"look up {key}", go)

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

        return await self._call(f"thaw {key}", go, small=True)

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            resp = await self._call(f"list {prefix}", functools.partial(self._client.list_objects_v2, **kw))
            for item in resp.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item["Size"]), item.get("LastModified"), item.get("StorageClass"))
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    async def delete(self, keys: list[str]) -> None:
        """Delete keys, 1,000 per request."""
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}

            resp = await self._call(
                "delete objects", functools.partial(self._client.delete_objects, Bucket=self.bucket, Delete=batch)
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"could not delete {len(errors)} objects, first {first.get('Key')}: {first.get('Message')}"
                )

    # -- multipart ----------------------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if self.checksum in _CHECK_ALGORITHMS:  # AWS wants the parts' algorithm declared up front
            kw["ChecksumAlgorithm"] = _CHECK_ALGORITHMS[self.checksum]
        kw.update(self._write_options(key)[1])
        resp = await self._call(f"start upload of {key}", lambda: self._client.create_multipart_upload(**kw))
        self._check_sse(key, resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}), silent_ok=True)
        return str(resp["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes, check: str | None = None, sha256: str | None = None
    ) -> tuple[str, str]:
        """(ETag, the part's checksum value): completing the upload names both."""
        value, sha256 = await self._hashes(data, check, sha256)
        param = _CHECK_PARAMS[self.checksum]
        query = f"?partNumber={number}&uploadId={urllib.parse.quote(upload_id, safe='~')}"

        pace = self._pace()

        async def direct(d: _Direct) -> str:
            headers = {CHECK_HEADERS[self.checksum]: value, **self._sse_c_headers}
            answer = await d.put("UploadPart", key, data, headers, sha256, query, pace)
            return answer["etag"]

        async def slow() -> str:
            resp = await self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_Body(data, sha256, pace),
                **{param: value},
                **self._sse_c_kw,
            )
            return str(resp["ETag"])

        try:
            etag = await self._call(f"upload part {number} of {key}", lambda: self._direct_or(direct, slow))
        finally:
            self._sent_all(pace)
        self.touch()  # parts carry backup data (files, the dump, manifests)
        return etag, value

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[str, str]]) -> None:
        """parts: (ETag, checksum value) of each part, in order."""
        param = _CHECK_PARAMS[self.checksum]
        listed: list[dict[str, Any]] = []
        for i, (etag, value) in enumerate(parts):
            part: dict[str, Any] = {"PartNumber": i + 1, "ETag": etag}
            if self.checksum in _CHECK_ALGORITHMS:
                part[param] = value
            listed.append(part)
        await self._call(
            f"finish upload of {key}",
            lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}, **self._sse_c_kw
            ),
        )
        self.touch()

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._call(
            f"abort upload of {key}",
            lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
        )

    async def list_multipart(self, prefix: str) -> list[tuple[str, str, Any]]:
        """(key, upload id, initiated) of unfinished multipart uploads under prefix."""
        out: list[tuple[str, str, Any]] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            try:
                resp = await self._call(
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


class MultipartUpload:
    """One multipart upload with parts sent concurrently; aborted on any error.

    `async with MultipartUpload(store, key, budget) as mp: await mp.add(data); ...` then
    `await mp.complete()`. Each part's bytes are counted against `budget` (acquired by
    `add`) until the part is sent. Leaving the block without complete() aborts the upload,
    so no error path leaves parts behind in the bucket.
    """

    def __init__(self, store: Store, key: str, budget: ByteBudget, max_inflight: int = 4) -> None:
        self.store = store
        self.key = key
        self.budget = budget
        self.upload_id: str | None = None
        self._etags: dict[int, tuple[str, str]] = {}  # number -> (ETag, checksum value)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_inflight)
        self._next = 1
        self._failure: BaseException | None = None
        self._completed = False
        self.size = 0  # bytes sent (after encryption, in an encrypted repository)
        sealing = store.sealing_for(key)
        self._enc = sealing.encryptor() if sealing is not None else None

    async def __aenter__(self) -> MultipartUpload:
        self.upload_id = await self.store.create_multipart(self.key)
        return self

    async def add(self, data: bytes, check: str | None = None, sha256: str | None = None, final: bool = False) -> None:
        """Queue the next part (its bytes must already be held in the budget by the caller,
        who hands them over: they are released once the part is sent). In an encrypted
        repository the part is sealed here, and check/sha256 (the plaintext's) are not
        used; `final`: nothing follows (else complete() seals the last chunk, held back)."""
        size = len(data)  # what the caller holds in the budget
        try:
            self._raise_failure()
            await self._slots.acquire()
        except BaseException:
            await asyncio.shield(self.budget.release(size))
            raise
        if self._enc is not None:
            enc, plain, checksum = self._enc, data, self.store.checksum

            def seal() -> tuple[bytes, str, str]:
                out = enc.push(plain, final)
                return out, *sealed_hashes(checksum, out)

            del data
            try:
                data, check, sha256 = await asyncio.to_thread(seal)
            except BaseException:
                self._slots.release()
                await asyncio.shield(self.budget.release(size))
                raise
            del plain
        number = self._next
        self._next += 1
        self.size += len(data)
        holder = [data]  # the task's only reference, dropped before the budget is given back
        del data

        async def send() -> None:
            try:
                assert self.upload_id is not None
                self._etags[number] = await self.store.upload_part(
                    self.key, self.upload_id, number, holder[0], check, sha256
                )
            except BaseException as exc:
                if self._failure is None:
                    self._failure = exc
                raise
            finally:
                holder.clear()
                self._slots.release()
                await asyncio.shield(self.budget.release(size))

        task = asyncio.create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # kept in self._failure; marks it retrieved

    @property
    def parts(self) -> int:
        return self._next - 1

    @property
    def sealed(self) -> bool:
        return self._enc is not None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._raise_failure()

    async def complete(self) -> None:
        if self._enc is not None and not self._enc.done:
            await self.add(b"", final=True)  # the held-back last chunk
        await self._drain()
        assert self.upload_id is not None
        try:
            await self.store.complete_multipart(
                self.key, self.upload_id, [self._etags[i] for i in range(1, self._next)]
            )
        except StoreError as exc:
            # The server may have completed it and its answer got lost: the retry then
            # finds no such upload. The key is this run's own, so an object there with
            # exactly the bytes sent is this upload.
            if exc.code != "NoSuchUpload" or await self.store.head(self.key) != self.size:
                raise
            log.info("the answer to completing %s was lost; the object is there with its %d bytes", self.key, self.size)
        self._completed = True

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._completed:
            return
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.upload_id is not None:
            # Bounded: S3 may be what failed. The original error matters more.
            await cleanup.best_effort(
                f"abort the unfinished upload of {self.key}", self.store.abort_multipart(self.key, self.upload_id)
            )


class StreamWriter:
    """Upload a stream of unknown length (pg_dump, manifests) to one key.

    Memory: the writer reserves a whole part in the budget before filling it, so it never
    waits for memory while holding unsent bytes (waiting then could wait for itself: the
    deadlock of parts grown past the budget). Parts grow with the part number (see
    stream_part_size) up to half the budget; a stream that ends within the first part is
    sent as one PUT. Abort on error via MultipartUpload.
    """

    def __init__(self, store: Store, key: str, budget: ByteBudget, part_size: int, max_inflight: int = 3) -> None:
        self.store = store
        self.key = key
        self.budget = budget
        self.part_size = part_size
        self.max_part = max(part_size, budget.limit // 2)
        self.max_inflight = max_inflight
        self.size = 0
        self.stored: int | None = None  # bytes in the bucket, once finished, when encrypted
        self.parts = 0  # how many requests the stream went up in (1 for a plain PUT)
        self._buf = bytearray()
        self._reserved = 0  # budget held for the part being filled
        self._mp: MultipartUpload | None = None

    async def __aenter__(self) -> StreamWriter:
        return self

    def _target(self) -> int:
        return stream_part_size((self._mp.parts if self._mp else 0) + 1, self.part_size, self.max_part)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._reserved:
                target = self._target()
                await self.budget.acquire(target)
                self._reserved = target
            room = self._reserved - len(self._buf)
            self._buf += view[:room]
            self.size += min(room, len(view))
            view = view[room:]
            if len(self._buf) >= self._reserved:
                await self._send_part()

    async def _send_part(self) -> None:
        if self._mp is None:
            self._mp = MultipartUpload(self.store, self.key, self.budget, self.max_inflight)
            await self._mp.__aenter__()
        if self._mp.parts >= MAX_PARTS - 1:  # one is kept for the end of the stream
            raise StoreError(
                f"{self.key} would need more than {MAX_PARTS} parts (the stream passed "
                f"{self.size // MIB} MiB): raise --max-memory, parts grow to half of it"
            )
        # bytes, not bytearray: botocore and aiohttp copy a bytearray body several times.
        part, self._buf = bytes(self._buf), bytearray()
        self._reserved -= len(part)  # handed over: the part upload releases it once sent
        await self._mp.add(part)
        await self._release_reserved()

    async def finish(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        if self._mp is None:
            await self.store.put(self.key, data, progress=True)
            self.parts = 1
            self.stored = self.store.stored_size(self.key, len(data))
        else:
            if data or self._mp.parts == 0:
                self._reserved -= len(data)
                await self._mp.add(data, final=True)
            await self._mp.complete()
            self.parts = self._mp.parts
            self.stored = self._mp.size if self._mp.sealed else None
            await self._mp.__aexit__(None, None, None)
            self._mp = None
        await self._release_reserved()

    async def _release_reserved(self) -> None:
        if self._reserved:
            held, self._reserved = self._reserved, 0
            await asyncio.shield(self.budget.release(held))

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._mp is not None:
            await self._mp.__aexit__(exc_type, exc, tb)
        await self._release_reserved()


def describe_credentials(settings: Settings) -> tuple[str, str]:
    """(redacted access key, where it came from) through the normal AWS chain."""
    import botocore.session

    try:
        creds = botocore.session.Session().get_credentials()
    except Exception as exc:  # a broken profile must not break `config`
        return ("(error)", f"AWS credential chain: {_short(exc)}")
    if creds is None:
        return ("(none found)", "AWS credential chain: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    key = creds.access_key or ""
    shown = key[:4] + "..." + key[-2:] if len(key) > 8 else "****"
    return (f"{shown} (secret redacted)", f"AWS credential chain: {creds.method}")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


async def why_no_repository(store: Store, endpoint: str | None) -> StoreError | None:
    """Why a repository's config.json is not there, when the reason is not an empty prefix:
    the bucket does not exist, or the endpoint is no S3 server at all (a web console's port,
    a typo). One listing, asked only after the config was found missing; None when the
    bucket lists fine (then there is simply no repository)."""
    where = endpoint or "AWS S3"
    not_s3 = (
        f"{where} is not an S3 endpoint (its answer to a bucket listing is no S3 listing): check "
        "S3_ENDPOINT_URL (the S3 API's address and port, not a web console's)"
    )
    try:
        async with asyncio.timeout(60):
            listing = await store._client.list_objects_v2(Bucket=store.bucket, MaxKeys=1)
        if "Name" not in listing and "IsTruncated" not in listing:  # an HTML page parses as empty XML
            return StoreError(not_s3)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {store.bucket!r} does not exist on {where}: create it or fix S3_BUCKET")
        if not code or code.isdigit():  # no S3 error document: some other web server answered
            return StoreError(
                f"{where} is not an S3 endpoint (a bucket listing got HTTP {status} without an S3 error): "
                "check S3_ENDPOINT_URL (the S3 API's address and port, not a web console's)"
            )
    except BotoCoreError as exc:
        if "pars" in type(exc).__name__.lower() or "pars" in str(exc).lower():
            return StoreError(not_s3)
    except TimeoutError:
        pass
    return None
