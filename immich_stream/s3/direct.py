"""The direct path: PutObject, UploadPart and GetObject straight through aiohttp (and GET
bodies read in worker threads), signed with botocore's own SigV4 signer, bypassing
botocore's per-request machinery. An error answer becomes the ClientError botocore would
raise, so the retry wrapper and its classification apply unchanged. Everything else goes
through aiobotocore (see store.py).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import logging
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import botocore.auth
import yarl
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError

from immich_stream.s3.checksums import CHUNK_SHARED, SMALL_FACTOR
from immich_stream.s3.classify import error_answer, short
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.pacing import RateLimit
from immich_stream.s3.patches import Body, Pace

log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class _Signer(botocore.auth.S3SigV4Auth):  # type: ignore[misc]  # botocore has no type hints
    """botocore's S3 SigV4, with the payload's sha256 given (computed in a worker thread)."""

    def payload(self, request: Any) -> str:
        return str(request.context["payload_sha256"])


def range_header(offset: int, end: int | None) -> str:
    """The Range header of the bytes [offset, end) (end None: to the object's end)."""
    return f"bytes={offset}-" if end is None else f"bytes={offset}-{end - 1}"


class DirectBody:
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


class Direct:
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
        options: StoreOptions,
        sslctx: ssl.SSLContext | bool,
    ) -> None:
        self._client = client
        self._proxy = proxy
        self._base = base.rstrip("/")
        self._region = region
        self._creds = client._request_signer._credentials
        self.session = session
        self.fetcher = Fetcher(base, sslctx, options) if proxy is None else None
        self.sse_c: dict[str, str] = {}  # SSE-C headers every GET carries (set by Store)

    @classmethod
    async def open(cls, client: Any, bucket: str, options: StoreOptions) -> Direct | None:
        """None when this client's setup is one the direct path does not cover."""
        if client._request_signer._credentials is None or not bucket:
            return None  # anonymous, or no bucket: botocore decides
        try:
            op = client.meta.service_model.operation_model("PutObject")
            ctx: dict[str, Any] = {}
            url, headers, _ = await client._resolve_endpoint_ruleset(op, {"Bucket": bucket, "Key": "k"}, ctx)
        except (AttributeError, TypeError, BotoCoreError) as exc:  # another aiobotocore: the slow path works
            log.debug("S3 requests go through botocore only: %s", short(exc))
            return None
        if headers or ctx.get("auth_type") not in ("v4", "s3v4", None):
            return None  # S3 Express, or an endpoint that wants extra headers
        region = ctx.get("signing", {}).get("region") or client.meta.region_name or "us-east-1"
        sslctx: ssl.SSLContext | bool = True
        if options.ca_bundle:
            sslctx = ssl.create_default_context(cafile=str(options.ca_bundle))
        elif not options.verify_tls:
            sslctx = False
        connector = aiohttp.TCPConnector(limit=options.jobs + 4, ssl=sslctx, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=options.read_timeout)
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
        return cls(client, url, region, session, proxy, options, sslctx)

    def url(self, key: str) -> str:
        return f"{self._base}/{urllib.parse.quote(key, safe='/~')}"

    async def _signed(self, method: str, url: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        creds = await self._creds.get_frozen_credentials()
        request = AWSRequest(method=method, url=url, headers=headers)
        request.context["payload_sha256"] = payload_sha256
        _Signer(creds, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    async def put(
        self,
        op: str,
        key: str,
        data: bytes,
        headers: dict[str, str],
        sha256_hex: str,
        query: str = "",
        pace: Pace | None = None,
    ) -> dict[str, str]:
        """One PUT; returns the answer's headers (lowercase names)."""
        url = self.url(key) + query
        signed = await self._signed("PUT", url, headers, sha256_hex)
        async with self.session.put(
            yarl.URL(url, encoded=True), data=Body(data, pace=pace), headers=signed, proxy=self._proxy
        ) as resp:
            body = await resp.read()
            if resp.status >= 300:
                raise _client_error(op, resp, body)
            return {k.lower(): v for k, v in resp.headers.items()}

    async def signed_get(self, key: str, offset: int, end: int | None = None) -> tuple[str, dict[str, str]]:
        """`end`: the byte after the last one wanted (None: to the object's end)."""
        url = self.url(key)
        headers = {"Range": range_header(offset, end)} if offset or end is not None else {}
        headers.update(self.sse_c)
        return url, await self._signed("GET", url, headers, EMPTY_SHA256)

    async def get(self, key: str, offset: int, end: int | None = None) -> DirectBody:
        url, signed = await self.signed_get(key, offset, end)
        resp = await self.session.get(yarl.URL(url, encoded=True), headers=signed, proxy=self._proxy)
        if resp.status >= 300:
            try:
                body = await resp.read()
            finally:
                resp.close()
            raise _client_error("GetObject", resp, body)
        return DirectBody(resp)


def _client_error(op: str, resp: aiohttp.ClientResponse, body: bytes) -> ClientError:
    return error_answer(op, resp.status, resp.reason or "", {k.lower(): v for k, v in resp.headers.items()}, body)


class _Broken(ConnectionError):
    """The connection failed or broke during a threaded GET (transient: resumed)."""


class SinkFailed(Exception):
    """The caller's sink raised: its error, not S3's (never retried, raised as it was)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Fetcher:
    """GET bodies read in worker threads over blocking keep-alive connections, straight
    into a reused buffer that the caller's sink consumes (hashes and writes) in the same
    thread.

    Through aiohttp every byte of a download passed through the event loop's one thread
    in 64 KiB pieces, copied twice (uvloop's read, the HTTP parser's body slice), then
    again into a batch for a worker thread: a restore used 2.2 CPU seconds of the loop
    per GiB, and on two cores shared with the S3 server (and anything else) the loop's
    thread was the limit. Here a thread receives (recv_into, the GIL released), hashes
    and writes 1 MiB at a time, and the loop only signs the request."""

    def __init__(self, base: str, sslctx: ssl.SSLContext | bool, options: StoreOptions) -> None:
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
        self._timeout = options.read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(options.jobs * SMALL_FACTOR, thread_name_prefix="s3-get")

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
                    raise error_answer("GetObject", resp.status, resp.reason or "", answer, body)
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
                    raise SinkFailed(exc) from exc
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
