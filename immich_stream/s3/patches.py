"""Process-wide patches to botocore and aiohttp, and the request body they apply to.

A `Body` is sent by aiohttp without copying and signed by botocore without hashing it
again; backup data goes out in slices through its `Pace` (--limit-upload, progress for the
stall watchdog). install_patches() is called by the first Store opened (not at import);
each patch only changes anything for a Body.
"""

from __future__ import annotations

import fcntl
import io
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.payload
import botocore.auth

from immich_stream.s3.checksums import MIB
from immich_stream.s3.pacing import RateLimit


class Body(io.BytesIO):
    """A request body that aiohttp sends without copying, and botocore signs without
    hashing it again.

    botocore turns a bytes Body into io.BytesIO (which shares the bytes), and aiohttp's
    BytesIOPayload calls getbuffer(), which unshares it: a full copy of every part in
    flight, doubling memory. Bodies of this type are sent as the bytes they wrap.

    Over plain HTTP, SigV4 signs the payload's sha256, which botocore computes in the
    event loop's thread (a third of the loop's time in a profile of a 1.5 GiB backup).
    When the caller already has that hash (computed in a worker thread while reading),
    it rides along here and the signer uses it."""

    def __init__(self, data: bytes, sha256_hex: str | None = None, pace: Pace | None = None) -> None:
        super().__init__(data)
        self.sha256_hex = sha256_hex
        self.pace = pace


@dataclass(eq=False)
class Pace:
    """How one body of backup data is sent: slice by slice (through `limit`, --limit-upload,
    when set), `sent(n)` told of each slice the connection took. `sock` is the connection's
    socket while the body is on its way: the stall watchdog reads how much of what was
    written the server has yet to acknowledge (Store.check_moving), so a part that takes
    minutes on a slow uplink is progress all along, also for its last bytes, which sit in
    the kernel's send buffer after the last write.

    Only bytes past the furthest point an earlier attempt reached are progress: a retry
    sends the body again from its start, and a frozen server's kernel still takes a few
    MiB of every new connection into its buffers, so counting them would keep the watchdog
    quiet for as long as there are retries (minutes) while Immich is down."""

    limit: RateLimit | None
    sent: Callable[[int], None]
    sock: Any = None
    written: int = 0  # bytes of the body the connection took in this attempt
    reached: int = 0  # the furthest `written` of any attempt: progress is only beyond it
    acked: int = 0  # the furthest point the server acknowledged, over all attempts


SLICE = MIB  # a body of backup data is written in slices this large (progress between them)


def unacked_bytes(sock: Any) -> int | None:
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

    pace: Pace | None = None

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
        pace.written = 0  # an attempt sends the body from its start
        view = memoryview(value)
        step = pace.limit.chunk if pace.limit is not None else SLICE
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            if pace.limit is not None:
                await pace.limit.take(len(piece))
            await writer.write(piece)
            pace.written += len(piece)
            if pace.written > pace.reached:
                pace.reached = pace.written
                pace.sent(len(piece))

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)


def _body_payload(value: Body, *args: Any, **kwargs: Any) -> aiohttp.payload.Payload:
    if value.tell() == 0:
        # getvalue() of a BytesIO made from bytes returns those very bytes
        payload = _HeadersFirstPayload(value.getvalue(), *args, **kwargs)
        payload.pace = value.pace
        return payload
    return aiohttp.payload.BytesIOPayload(value, *args, **kwargs)


_installed = False


def install_patches() -> None:
    """Process-wide changes to botocore and aiohttp, made once, by the first Store opened
    (not at import). Each only changes anything for a Body: every other request is
    signed and sent exactly as botocore and aiohttp would."""
    global _installed
    if _installed:
        return
    botocore.auth.AUTH_TYPE_MAPS["s3v4"] = _S3SigV4
    # A factory is accepted at run time although the hints say a Payload class.
    aiohttp.payload.PAYLOAD_REGISTRY.register(_body_payload, Body, order=aiohttp.payload.Order.try_first)  # type: ignore[arg-type]
    _installed = True


def drop_expect_header(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for `Expect: 100-continue` on every PUT with a file-like body; aiohttp
    then waits for the server's 100 Continue with no timeout at all. A server that never
    sends it (seen with rclone, about one run in ten of the bench) hung the backup. The
    preflight already proved the credentials, which is what 100-continue would save a
    body's bandwidth for."""
    params.get("headers", {}).pop("Expect", None)
