"""An HTTP proxy in front of a real S3 server that injects faults on demand.

The one fake in the suite: real servers cannot be told "fail the 3rd part upload" or
"answer slowly". Requests are forwarded unchanged (Host included, so signatures hold).
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

Match = Callable[[str, str, dict[str, str]], bool]  # (method, path, query) -> bool


@dataclass
class Rule:
    match: Match
    status: int | None = None  # answer this status instead of forwarding
    delay: float = 0.0  # seconds to wait before forwarding
    times: int | None = None  # how many requests it applies to (None: all)
    corrupt: bool = False  # flip one byte of the request body on its way
    after: bool = False  # forward the request, then answer `status` instead (a lost answer)
    code: str = "InternalError"  # the S3 error Code answered with `status`
    headers: dict[str, str] | None = None  # extra headers of that answer (e.g. a server's Date)
    rate: float = 0.0  # stream the response body at this many bytes per second (0: at once)
    cut_after: int | None = None  # send this many bytes of the response body, then drop the connection
    hits: int = 0
    sent: int = 0  # response body bytes sent for the requests this rule matched (rate/cut_after rules)
    flaky: Flaky | None = None  # fail a seeded random share of the matching requests (add_flaky)
    upload_rate: float = 0.0  # take the request body at this many bytes per second (a slow uplink)
    hold_after: int | None = None  # with upload_rate: stop taking the body after this many bytes (frozen)
    headers_seen: list[dict[str, str]] = field(default_factory=list)  # request headers, lowercase, of each hit
    requests_seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path?query, headers)


def is_part_upload(method: str, path: str, query: dict[str, str]) -> bool:
    return method == "PUT" and "partNumber" in query


def is_put(method: str, path: str, query: dict[str, str]) -> bool:
    return method == "PUT"


def any_request(method: str, path: str, query: dict[str, str]) -> bool:
    return True


def per_second(events: list[tuple[float, int]]) -> list[int]:
    """Bytes per whole second from the first event to the last (the last, partial second
    left out)."""
    if not events:
        return []
    start = events[0][0]
    seconds = int(events[-1][0] - start)
    out = [0] * max(seconds, 0)
    for t, n in events:
        i = int(t - start)
        if i < seconds:
            out[i] += n
    return out


def get_of(suffix: str) -> Match:
    """GETs of the object whose key ends with suffix."""
    return lambda method, path, query: method == "GET" and path.endswith(suffix)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, int]] = []
        # (monotonic time, bytes) of request bodies as they arrive, and of response bodies
        # as the client takes them (record_sent): how evenly bytes move, second by second
        self.arrived: list[tuple[float, int]] = []
        self.record_sent = False
        self.sent: list[tuple[float, int]] = []
        # requests in the proxy now, and (method, path, how many were in it then) as each arrived
        self.open = 0
        self.arrivals: list[tuple[str, str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(
        self,
        match: Match,
        status: int | None = None,
        delay: float = 0.0,
        times: int | None = None,
        corrupt: bool = False,
        after: bool = False,
        code: str = "InternalError",
        headers: dict[str, str] | None = None,
        rate: float = 0.0,
        cut_after: int | None = None,
        upload_rate: float = 0.0,
        hold_after: int | None = None,
    ) -> Rule:
        rule = Rule(match, status, delay, times, corrupt, after, code, headers, rate, cut_after)
        rule.upload_rate, rule.hold_after = upload_rate, hold_after
        self.rules.append(rule)
        return rule

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.open += 1
        self.arrivals.append((request.method, request.path, self.open))
        try:
            return await self._answer(request)
        finally:
            self.open -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        corrupt = False
        lost_answer: int | None = None
        streamed: Rule | None = None  # a rule that shapes the response body
        chunks = []
        throttle = self._throttle(request, query)
        if throttle is not None:
            await self._read_slowly(request, throttle, chunks)
        else:
            async for chunk in request.content.iter_any():
                self.arrived.append((time.monotonic(), len(chunk)))
                chunks.append(chunk)
        body = b"".join(chunks)
        for rule in self.rules:
            if rule.upload_rate:
                continue  # applied while the body was read
            if rule.flaky is not None:
                if rule.match(request.method, request.path, query):
                    failed = await self._flaky(rule, request)
                    if failed is not None:
                        return failed
                continue
            if rule.corrupt and not body:
                continue  # nothing to corrupt in an empty body
            if (rule.times is None or rule.hits < rule.times) and rule.match(request.method, request.path, query):
                rule.hits += 1
                rule.headers_seen.append({k.lower(): v for k, v in request.headers.items()})
                rule.requests_seen.append((request.method, request.path_qs, rule.headers_seen[-1]))
                if rule.delay:
                    await asyncio.sleep(rule.delay)
                if rule.status is not None and rule.after:
                    lost_answer = rule.status
                    break
                if rule.status is not None:
                    self.requests.append((request.method, request.path_qs, rule.status))
                    body = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{rule.code}</Code>"
                        "<Message>injected by the test proxy</Message></Error>"
                    )
                    return web.Response(
                        status=rule.status, body=body.encode(), content_type="application/xml", headers=rule.headers
                    )
                corrupt = rule.corrupt
                if rule.rate or rule.cut_after is not None:
                    streamed = rule
                break
        if corrupt:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x01
            body = bytes(flipped)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as up:
            if streamed is not None and request.method != "HEAD":
                return await self._stream(request, up, streamed)
            data = await up.read()
            self.requests.append((request.method, request.path_qs, up.status))
            if lost_answer is not None:  # the server did it; the client never hears so
                self.requests.append((request.method, request.path_qs, lost_answer))
                body = (
                    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                    "<Message>injected by the test proxy after forwarding</Message></Error>"
                )
                return web.Response(status=lost_answer, body=body.encode(), content_type="application/xml")
            dropped = (
                ("transfer-encoding", "connection")
                if request.method == "HEAD"
                else ("content-length", "transfer-encoding", "connection")
            )  # HEAD: the size is the answer
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in dropped}
            if request.method == "HEAD":
                return web.Response(status=up.status, headers=out_headers)
            if self.record_sent and data:
                return await self._send_recorded(request, up.status, out_headers, data)
            return web.Response(status=up.status, body=data, headers=out_headers)

    def _throttle(self, request: web.Request, query: dict[str, str]) -> Rule | None:
        for rule in self.rules:
            if (
                rule.upload_rate
                and (rule.times is None or rule.hits < rule.times)
                and rule.match(request.method, request.path, query)
            ):
                rule.hits += 1
                return rule
        return None

    async def _read_slowly(self, request: web.Request, rule: Rule, chunks: list[bytes]) -> None:
        """The body at rule.upload_rate, as a slow uplink delivers it: the receive buffer
        held small, so the client's socket sees the pace (not megabytes taken at once by
        loopback's autotuned buffers); after hold_after bytes nothing more is taken."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        taken = 0
        while True:
            if rule.hold_after is not None and taken >= rule.hold_after:
                await asyncio.sleep(3600)
            chunk = await request.content.read(16 << 10)
            if not chunk:
                return
            taken += len(chunk)
            self.arrived.append((time.monotonic(), len(chunk)))
            chunks.append(chunk)
            await asyncio.sleep(len(chunk) / rule.upload_rate)

    async def _send_recorded(
        self, request: web.Request, status: int, headers: dict[str, str], data: bytes
    ) -> web.StreamResponse:
        """The body in 64 KiB writes, each awaited until the connection took it (as far as
        the kernel's socket buffers let us see), its time recorded in `sent`."""
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        # A server's send buffer is not the user's line: loopback autotunes it up to 4 MiB
        # per connection, which counted megabytes as sent that the client had not let in.
        # Held small, what is counted is what the client's receive window let through.
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        await resp.prepare(request)
        view = memoryview(data)
        for start in range(0, len(view), 64 << 10):
            piece = view[start : start + (64 << 10)]
            await resp.write(piece)
            self.sent.append((time.monotonic(), len(piece)))
        await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, up: aiohttp.ClientResponse, rule: Rule) -> web.StreamResponse:
        """Pass the body on slowly (rate) or only its first bytes (cut_after), announcing its full length."""
        self.requests.append((request.method, request.path_qs, up.status))
        headers = {k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        sent = 0
        async for chunk in up.content.iter_chunked(16 << 10):
            if rule.cut_after is not None and sent + len(chunk) >= rule.cut_after:
                chunk = chunk[: rule.cut_after - sent]
                await resp.write(chunk)
                rule.sent += len(chunk)
                await asyncio.sleep(0.05)  # let the bytes leave before the connection drops
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            rule.sent += len(chunk)
            if rule.rate:
                await asyncio.sleep(len(chunk) / rule.rate)
        await resp.write_eof()
        return resp

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()
            await self._session.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:  # requests still held by a `delay` rule
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- flaky: a seeded random share of requests fails (the chaos suite) ------------------

    def add_flaky(
        self, match: Match, rate: float = 0.10, seed: int = 0, slow: tuple[float, float] = (2.0, 6.0)
    ) -> Rule:
        """Fail `rate` of the matching requests, drawn from random.Random(seed): each failure
        is a 500, a 503, a reset (the connection closed without an answer) or a slow answer
        (forwarded after a delay drawn from `slow`). Other rules still apply to the rest."""
        rule = Rule(match, flaky=Flaky(rate, seed, slow))
        self.rules.append(rule)
        return rule

    async def _flaky(self, rule: Rule, request: web.Request) -> web.StreamResponse | None:
        assert rule.flaky is not None
        kind, delay = rule.flaky.draw()
        if kind is None:
            return None
        rule.hits += 1
        if kind == "slow":
            await asyncio.sleep(delay)
            return None  # then forwarded as usual
        if kind == "reset":
            self.requests.append((request.method, request.path_qs, 0))
            assert request.transport is not None
            request.transport.abort()  # no answer at all: the client sees the connection drop
            raise asyncio.CancelledError  # aiohttp drops a handler cancelled by a lost connection silently
        status = int(kind)
        self.requests.append((request.method, request.path_qs, status))
        code = "InternalError" if status == 500 else "ServiceUnavailable"
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            "<Message>injected by the test proxy</Message></Error>"
        )
        return web.Response(status=status, body=body.encode(), content_type="application/xml")


FLAKY_KINDS = ("500", "503", "reset", "slow")


@dataclass
class Flaky:
    rate: float
    seed: int
    slow: tuple[float, float]
    counts: dict[str, int] = field(default_factory=dict)  # failures injected, by kind
    seen: int = 0  # matching requests

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> tuple[str | None, float]:
        """(kind or None, delay): the same seed gives the same sequence of draws."""
        self.seen += 1
        fail, kind, delay = self._rng.random(), self._rng.choice(FLAKY_KINDS), self._rng.uniform(*self.slow)
        if fail >= self.rate:
            return None, 0.0
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind, delay
