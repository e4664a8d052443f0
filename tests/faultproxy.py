"""An HTTP proxy in front of a real S3 server that injects faults on demand.

The one fake in the suite: real servers cannot be told "fail the 3rd part upload" or
"answer slowly". Requests are forwarded unchanged (Host included, so signatures hold).
"""

from __future__ import annotations

import asyncio
import random
import threading
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
    hits: int = 0
    flaky: Flaky | None = None  # fail a seeded random share of the matching requests (add_flaky)


def is_part_upload(method: str, path: str, query: dict[str, str]) -> bool:
    return method == "PUT" and "partNumber" in query


def is_put(method: str, path: str, query: dict[str, str]) -> bool:
    return method == "PUT"


def any_request(method: str, path: str, query: dict[str, str]) -> bool:
    return True


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, match: Match, status: int | None = None, delay: float = 0.0, times: int | None = None,
            corrupt: bool = False) -> Rule:
        rule = Rule(match, status, delay, times, corrupt)
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
        query = dict(request.query)
        corrupt = False
        body = await request.read()
        for rule in self.rules:
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
                if rule.delay:
                    await asyncio.sleep(rule.delay)
                if rule.status is not None:
                    self.requests.append((request.method, request.path_qs, rule.status))
                    body = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                            "<Message>injected by the test proxy</Message></Error>")
                    return web.Response(status=rule.status, body=body.encode(), content_type="application/xml")
                corrupt = rule.corrupt
                break
        if corrupt:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x01
            body = bytes(flipped)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as up:
            data = await up.read()
            self.requests.append((request.method, request.path_qs, up.status))
            dropped = ("transfer-encoding", "connection") if request.method == "HEAD" else (
                "content-length", "transfer-encoding", "connection")  # HEAD: the size is the answer
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in dropped}
            if request.method == "HEAD":
                return web.Response(status=up.status, headers=out_headers)
            return web.Response(status=up.status, body=data, headers=out_headers)

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

    def add_flaky(self, match: Match, rate: float = 0.10, seed: int = 0,
                  slow: tuple[float, float] = (2.0, 6.0)) -> Rule:
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
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                "<Message>injected by the test proxy</Message></Error>")
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
