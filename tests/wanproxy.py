"""A TCP proxy that behaves like a wide-area link: a round trip, a shared rate, a window.

    .venv/bin/python tests/wanproxy.py --listen 9100 --upstream 127.0.0.1:9000 \
        --rtt-ms 30 --rate 40 --window 4096

Every byte that crosses the proxy, in either direction:

- waits its turn in that direction's token bucket: `--rate` MiB/s per direction, SHARED by
  every connection (one uplink, one downlink; a debt bucket, so bytes leave in the order
  they asked and together never exceed the rate);
- then arrives at the other side half a round trip later (`--rtt-ms` / 2 each way);
- and counts as in flight until a whole round trip after it left (the acknowledgement's way
  back): a connection has at most `--window` KiB in flight per direction, so one connection
  carries at most window / RTT however fast the link, as TCP does.

A new connection pays one round trip before its first byte moves (the handshake). Nothing is
changed in the bytes: HTTP, signatures and checksums pass as they are. Usable from tests and
the bench as a thread (WanProxy(...).start()) or as this command (a process of its own, whose
CPU the bench can tell apart from the tool's). Not a fake S3: a link in front of a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field

MIB = 1024 * 1024
KIB = 1024
READ = 64 * KIB  # the most one read takes from a socket (a TCP segment train, not a part)


class Bucket:
    """`rate` bytes per second, shared: each caller reserves its bytes and sleeps out its debt."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(16 * KIB, rate / 200)  # 5 ms worth: a link does not save up a burst
        self._tokens = self.burst
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


@dataclass
class Direction:
    """One direction of the link: its bucket and what crossed it."""

    name: str
    bucket: Bucket | None
    bytes: int = 0
    first: float = 0.0  # monotonic time of the first byte, and of the last
    last: float = 0.0

    def moved(self, n: int) -> None:
        now = time.monotonic()
        if not self.bytes:
            self.first = now
        self.bytes += n
        self.last = now


@dataclass
class Stats:
    connections: int = 0
    open: int = 0
    peak_open: int = 0  # connections open at once, at most
    up: Direction = field(default_factory=lambda: Direction("up", None))
    down: Direction = field(default_factory=lambda: Direction("down", None))


class WanProxy:
    """The link, listening on 127.0.0.1:`port` (0: any free port) in front of `upstream`
    (host:port). start() runs it in a thread of its own (for tests); serve() in the caller's loop."""

    def __init__(
        self,
        upstream: str,
        rtt_ms: float = 30.0,
        rate_mib: float = 40.0,
        window_kib: int = 4096,
        port: int = 0,
        log: str | None = None,
    ) -> None:
        host, _, p = upstream.rpartition(":")
        self.upstream = (host.removeprefix("http://") or "127.0.0.1", int(p))
        self.half = rtt_ms / 2000.0
        self.rate = rate_mib * MIB
        self.window = window_kib * KIB
        self.port = port
        self.log = log  # a file to which the bytes moved so far are appended every 50 ms
        self.stats = Stats()
        self.stats.up.bucket = Bucket(self.rate) if rate_mib > 0 else None
        self.stats.down.bucket = Bucket(self.rate) if rate_mib > 0 else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._logger: asyncio.Future[None] | None = None
        # the connections' tasks: the loop holds tasks weakly, and a connection idle in a
        # client's pool (both sides waiting to read) must not be collected as garbage
        self._conns: set[asyncio.Task[None] | asyncio.Future[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Count from zero (the bench: one tool's run at a time)."""
        for d in (self.stats.up, self.stats.down):
            d.bytes, d.first, d.last = 0, 0.0, 0.0
        self.stats.connections = 0
        self.stats.peak_open = self.stats.open

    # -- as a thread ---------------------------------------------------------------------------

    def start(self) -> WanProxy:
        ready = threading.Event()

        def run() -> None:
            try:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.listen())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="wanproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("wanproxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- the link --------------------------------------------------------------------------------

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        await self.listen()
        assert self._server is not None
        if self.log:
            self._logger = asyncio.ensure_future(self._log(self.log))
        async with self._server:
            await self._server.serve_forever()

    async def _log(self, path: str) -> None:
        """Lines of `monotonic-time up-bytes down-bytes open-connections` (cumulative), every
        50 ms while bytes move: the bench reads when the link sat idle during a tool's run."""
        s = self.stats
        last = (-1, -1, -1)
        with open(path, "a", buffering=1) as fh:
            while True:
                now = (s.up.bytes, s.down.bytes, s.open)
                if now != last:
                    fh.write(f"{time.monotonic():.3f} {now[0]} {now[1]} {now[2]}\n")
                    last = now
                await asyncio.sleep(0.05)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        s = self.stats
        s.connections += 1
        s.open += 1
        s.peak_open = max(s.peak_open, s.open)
        me = asyncio.current_task()
        uwriter: asyncio.StreamWriter | None = None
        pipes: list[asyncio.Task[None]] = []
        try:
            await asyncio.sleep(2 * self.half)  # the handshake's round trip
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
            pipes = [
                asyncio.ensure_future(self._pipe(creader, uwriter, s.up)),
                asyncio.ensure_future(self._pipe(ureader, cwriter, s.down)),
            ]
            self._conns.update(t for t in (me, *pipes) if t is not None)
            # a failed side ends the connection; a clean EOF waits for the other side's
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        except OSError:
            pass
        finally:
            self._conns.difference_update(pipes)
            if me is not None:
                self._conns.discard(me)
            for task in pipes:
                task.cancel()
            for task in pipes:
                with contextlib.suppress(BaseException):
                    await task
            s.open -= 1
            for w in (cwriter, uwriter):
                if w is not None:
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: Direction) -> None:
        """Bytes from reader to writer across the link: paced, delayed, windowed. Ends at EOF
        (passed on), or raises when either socket fails."""
        loop = asyncio.get_running_loop()
        inflight = 0
        wake = asyncio.Event()  # an acknowledgement came back, or the sender stopped
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = asyncio.Event()
        ended = False

        def ack(n: int) -> None:
            nonlocal inflight
            inflight -= n
            wake.set()

        async def deliver() -> None:
            try:
                while True:
                    while not queue:
                        if ended:
                            if writer.can_write_eof():
                                writer.write_eof()
                            return
                        queued.clear()
                        await queued.wait()
                    due, data = queue.popleft()
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
                    d.moved(len(data))
                    # the acknowledgement is back half a round trip after the byte arrived
                    loop.call_later(self.half, ack, len(data))
            finally:
                wake.set()

        sender = asyncio.ensure_future(deliver())
        try:
            while not sender.done():
                if inflight >= self.window:
                    wake.clear()
                    await wake.wait()
                    continue
                data = await reader.read(min(READ, self.window - inflight))
                if not data:
                    break
                if d.bucket is not None:
                    await d.bucket.take(len(data))
                inflight += len(data)
                queue.append((loop.time() + self.half, data))
                queued.set()
            ended = True
            queued.set()
            await asyncio.shield(sender)
        finally:
            sender.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--upstream", required=True, help="host:port of the S3 server")
    ap.add_argument("--rtt-ms", type=float, default=30.0, help="round trip per connection (half each way)")
    ap.add_argument("--rate", type=float, default=40.0, help="MiB/s per direction, shared by all connections (0: none)")
    ap.add_argument("--window", type=int, default=4096, help="KiB in flight per connection per direction")
    ap.add_argument("--log", help="append `time up down open` lines to this file every 50 ms")
    args = ap.parse_args()
    proxy = WanProxy(args.upstream, args.rtt_ms, args.rate, args.window, args.listen, args.log)
    try:
        import uvloop

        uvloop.run(proxy.serve())
    except ImportError:
        asyncio.run(proxy.serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
