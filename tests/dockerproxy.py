"""A Docker Engine API proxy on a unix socket that can fail `stop` for one container.

Docker cannot be told to fail a stop on demand, so this sits between the CLI under test
(DOCKER_HOST=unix://PATH) and dockerd. Every request is forwarded byte for byte; after a
request that asks for an upgrade (`docker exec` attach: pg_dump, psql, pg_isready) the
connection becomes a raw byte stream both ways, half-close included (psql needs EOF on
its stdin while its answer is still read). The one exception: `POST /v*/containers/<name
or id>/stop` of the chosen container is answered HTTP 500 {"message": "injected"} and
never reaches dockerd, so that container keeps running. And `hang`: a request it matches is
read but never forwarded nor answered (a wedged dockerd), until `stop()`.

Responses are not parsed: the client (aiohttp) sends its next request on a connection
only after reading the previous answer, so an injected answer never interleaves with one
from dockerd.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
from collections.abc import Callable
from typing import Any

DOCKER_SOCK = "/var/run/docker.sock"
_STOP = re.compile(r"^(?:/v[0-9.]+)?/containers/([^/]+)/stop$")
_COPY = 1 << 16


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def docker_api(path: str, sock: str = DOCKER_SOCK, method: str = "GET", timeout: float = 10) -> Any:
    """One Docker Engine API call, straight to dockerd (the test's own view, not the CLI's)."""
    conn = _UnixHTTPConnection(sock, timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"docker {method} {path}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body) if body else None
    finally:
        conn.close()


class DockerProxy:
    """`DockerProxy(path)`; `fail_stop("immich_server")`; DOCKER_HOST=unix://path; `stop()`."""

    def __init__(self, path: str, upstream: str = DOCKER_SOCK) -> None:
        self.path = path
        self.upstream = upstream
        self.fail_names: set[str] = set()
        self.injected: list[str] = []  # paths of the stop requests answered 500
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.upgrades = 0  # connections that became raw streams (exec attach)
        # (method, path) -> True: hold that request forever, unanswered (dockerd wedged)
        self.hang: Callable[[str, str], bool] | None = None
        self.hung: list[tuple[str, str]] = []  # the requests held so far
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="docker-proxy")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Docker proxy did not start")

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def fail_stop(self, name: str | None) -> None:
        """Answer 500 to every stop of this container (by name or id); None: fail nothing."""
        if name is None:
            self.fail_names = set()
            return
        cid = docker_api(f"/containers/{name}/json", self.upstream)["Id"]
        self.fail_names = {name, cid, cid[:12]}

    # -- the server -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_unix_server(self._serve, self.path))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_unix_connection(self.upstream)
        except OSError:
            cwriter.close()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._client_to_docker(creader, cwriter, uwriter))
                tg.create_task(_pipe(ureader, cwriter))
        except* (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a reset or a malformed request: drop both sides, as a broken connection would
        except* asyncio.CancelledError:
            pass  # the proxy is shutting down: this connection ends with it
        finally:
            for w in (cwriter, uwriter):
                w.close()

    async def _client_to_docker(
        self, reader: asyncio.StreamReader, client: asyncio.StreamWriter, docker: asyncio.StreamWriter
    ) -> None:
        """Forward requests one by one (looking at each head), until an upgrade; then raw."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:  # EOF between requests
                if exc.partial:
                    docker.write(exc.partial)
                break
            lines = head.split(b"\r\n")
            method, target = lines[0].split(b" ")[:2]
            headers = {}
            for ln in lines[1:]:
                if b":" in ln:
                    k, v = ln.split(b":", 1)
                    headers[k.strip().lower()] = v.strip().lower()
            path = target.split(b"?", 1)[0].decode()
            self.requests.append((method.decode(), path))
            if self.hang is not None and self.hang(method.decode(), path):
                self.hung.append((method.decode(), path))
                await asyncio.Event().wait()  # never set: cancelled by stop()
            m = _STOP.match(path)
            if method == b"POST" and m and m.group(1) in self.fail_names:
                await _copy_body(reader, headers, None)
                self.injected.append(path)
                body = b'{"message": "injected"}'
                client.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await client.drain()
                continue
            docker.write(head)
            await _copy_body(reader, headers, docker)
            if b"upgrade" in headers.get(b"connection", b"") or b"upgrade" in headers:
                self.upgrades += 1
                break  # from here on the connection is a raw stream (stdin of the exec)
        await _pipe(reader, docker)

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _copy_body(
    reader: asyncio.StreamReader, headers: dict[bytes, bytes], out: asyncio.StreamWriter | None
) -> None:
    """Copy (or, with out=None, skip) one request body: Content-Length or chunked."""

    def emit(data: bytes) -> None:
        if out is not None:
            out.write(data)

    if b"chunked" in headers.get(b"transfer-encoding", b""):
        while True:
            size_line = await reader.readuntil(b"\r\n")
            emit(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    emit(trailer)
                emit(b"\r\n")
                break
            emit(await reader.readexactly(size + 2))  # the chunk and its CRLF
            if out is not None:
                await out.drain()
    else:
        left = int(headers.get(b"content-length", b"0") or 0)
        while left:
            data = await reader.readexactly(min(left, _COPY))
            left -= len(data)
            emit(data)
            if out is not None:
                await out.drain()
    if out is not None:
        await out.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (half-close) so the other direction can finish."""
    while data := await reader.read(_COPY):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()
