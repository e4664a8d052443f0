"""Commands inside containers through docker exec: argument lists, never a shell.

Short commands (run_in_container), a command's output as a stream (stream_out), chunks fed
to a command's stdin (pipe_into). Postgres's use of them is in postgres.py.

Creating an exec, starting it (the attach handshake) and asking for its exit code are
requests with the client's deadline (stack.DeadlineDocker); the output that follows is a
stream without one (pg_dump and psql may rightly be silent for long).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiodocker
import aiohttp

from immich_stream.errors import DumpError, StackError

EXIT_WAIT = 30.0  # seconds a failed command fed by pipe_into gets to exit (a rollback) before we go on
EXIT_POLL = 0.5  # seconds between looks at whether a command fed by pipe_into is still running
EXIT_DRAIN = 2.0  # seconds to read what a command that exited early still has on its way


async def exec_in(docker: aiodocker.Docker, container: str, cmd: list[str], stdin: bool = False) -> Any:
    try:
        c = docker.containers.container(container)
        return await c.exec(cmd=cmd, stdin=stdin, tty=False)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise StackError(f"container {container} not found: set DB_CONTAINER to the database container") from None
        if exc.status == 409:
            raise StackError(f"container {container} is not running: start it first") from None
        raise StackError(f"cannot run {cmd[0]} in {container}: {exc.message}") from None


async def attach(exe: Any) -> Any:
    """Start an exec attached (its stream); the handshake bounded like any request."""
    stream = exe.start(detach=False)
    deadline = getattr(exe.docker, "deadline", None)
    try:
        async with asyncio.timeout(deadline):
            await stream._init()  # what `async with stream` would do first, unbounded
    except TimeoutError:
        raise StackError(
            f"Docker did not start the exec within {deadline:.0f} s: dockerd seems wedged; check it and run again"
        ) from None
    return stream


async def exit_code_of(exe: Any) -> int:
    # The exit code can be None for a moment after the output ends.
    delay = 0.01
    for _ in range(400):
        info = await exe.inspect()
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise StackError("docker exec did not report an exit code")


async def run_in_container(docker: aiodocker.Docker, container: str, cmd: list[str]) -> tuple[int, bytes]:
    """Run a short command; return (exit code, stdout+stderr)."""
    exe = await exec_in(docker, container, cmd)
    out = bytearray()
    async with await attach(exe) as stream:
        while (msg := await stream.read_out()) is not None:
            out += msg.data
    return await exit_code_of(exe), bytes(out)


async def stream_out(docker: aiodocker.Docker, container: str, cmd: list[str], what: str) -> AsyncIterator[bytes]:
    """Yield a command's stdout as it comes; raise DumpError with its stderr if it fails."""
    exe = await exec_in(docker, container, cmd)
    err = bytearray()
    async with await attach(exe) as stream:
        while (msg := await stream.read_out()) is not None:
            if msg.stream == 1:
                yield msg.data
            else:
                err += msg.data
                del err[:-4096]
    code = await exit_code_of(exe)
    if code != 0:
        text = err.decode(errors="replace").strip().replace("\n", " | ") or f"exit code {code}"
        raise DumpError(f"{what} failed in {container}: {text}")


async def pipe_into(
    docker: aiodocker.Docker, container: str, cmd: list[str], chunks: AsyncGenerator[bytes, None], what: str
) -> bytes:
    """Feed chunks to a command's stdin while reading its output; raise DumpError if it fails.

    Output is read concurrently (psql blocks when its output pipe is full) and only its
    last 8 KiB kept. stdin is half-closed at the end so the output can still be read.

    The command sees end of input however this ends (dockerd closes its stdin when the
    stream closes), so a prefix of `chunks` must be harmless on its own: the database
    restore sends COMMIT last. On failure or cancellation we wait (bounded) for the command
    to exit, so that nothing is started against the database while it rolls back."""
    exe = await exec_in(docker, container, cmd, stdin=True)
    out = bytearray()
    fed = False  # every chunk was handed to the command
    started = False
    try:
        async with await attach(exe) as stream, contextlib.aclosing(chunks):
            started = True

            async def read() -> None:
                while (msg := await stream.read_out()) is not None:
                    out.extend(msg.data)
                    del out[:-8192]

            async def write() -> None:
                nonlocal fed
                async for chunk in chunks:
                    try:
                        await stream.write_in(chunk)
                    except (ConnectionError, aiohttp.ClientConnectionError):
                        return  # the command is gone; its exit code and output say why
                resp = stream._resp
                transport = resp.connection.transport if resp is not None and resp.connection else None
                if transport is None or transport.is_closing():
                    return  # the command is gone before the end
                fed = True
                if transport.can_write_eof():
                    transport.write_eof()  # EOF for the command, the answer still readable
                else:  # pragma: no cover - every Docker transport here supports half-close
                    await stream.close()

            async def watch(reader: asyncio.Task[None], writer: asyncio.Task[None]) -> None:
                # dockerd stops reading our side once the command exited (psql stopping at
                # its first error) but keeps the stream open: notice the exit, stop feeding
                # it, take what it said, and go, so that the failure is reported when it
                # happens, not when a buffer somewhere gives up.
                while not writer.done():
                    await asyncio.wait({writer}, timeout=EXIT_POLL)
                    try:
                        if writer.done() or (await exe.inspect()).get("Running", True):
                            continue
                    except aiodocker.DockerError:
                        return  # no answer: the stream's end tells, as before
                    writer.cancel()
                    await asyncio.wait({reader}, timeout=EXIT_DRAIN)  # its last words
                    reader.cancel()

            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(read())
                tg.create_task(watch(reader, tg.create_task(write())))
    except BaseException:
        if started:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                await asyncio.wait_for(asyncio.shield(exit_code_of(exe)), EXIT_WAIT)
        raise
    code = await exit_code_of(exe)
    if code != 0 or not fed:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln or "FATAL" in ln] or lines[-3:] or [f"exit code {code}"]
        if not fed and code == 0:
            errors = ["it stopped reading its input before the end"]
        raise DumpError(f"{what} failed in {container}: {' | '.join(errors[:3])}")
    return bytes(out)
