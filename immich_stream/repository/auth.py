"""Authenticity of what an encrypted repository says (docs/threat-model.md).

age seals to public keys, and config.json names them: anyone who can write the bucket can
seal a manifest, a snapshot.json and objects that open with the identity. So config.json,
every snapshot.json and every manifest carry an HMAC-SHA256 keyed by a repository
authentication key that only the identity holder has, checked before anything in them is
believed; data objects are bound by the sha256 their (authenticated) manifest records.

The key is 32 random bytes kept in the age identity file itself, as a comment line that
the age CLI ignores:

    # immich-stream-auth: <base64 key>            the repository was authenticated with it
    # immich-stream-auth: <base64 key> pending    set up on trust, not finished yet

It is never derived from anything in the bucket (a key sealed to the bucket's recipients
would be one an attacker can seal too), it survives `key rotate` (the file is rewritten
with it), and `key show` prints the line for the recovery material kept off the machine.

Manifests are streamed (larger than memory): after each block of lines the writer puts a
line {"auth": <hex>, "n": <lines>, "end": <bool>} whose MAC covers the previous block's MAC,
the block's number, whether it is the last, and the sha256 of the block's bytes, and the
snapshot id. A reader yields a block's lines only after its MAC matched, and requires the
last block to be marked: no line of a forged, reordered, spliced or truncated manifest is
ever acted on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immich_stream.config import TRUST_BUCKET_ENV
from immich_stream.config.keys import AUTH_LINE, AUTH_PENDING, auth_key
from immich_stream.errors import ForgedError

LINE = AUTH_LINE
PENDING = AUTH_PENDING
# =1: the user says the bucket is trusted: read a repository without its authentication key,
# authenticate its current state once, on trust (config.Tuning.trust_bucket, read by load())
TRUST_ENV = TRUST_BUCKET_ENV
MAX_BLOCK = 16 << 20  # plaintext bytes of manifest lines between two MAC lines (the writer: ~1 MiB)


@dataclass(frozen=True)
class RepoAuth:
    key: bytes
    ready: bool = True  # False: the set-up on trust was interrupted; unauthenticated items still pass

    def __repr__(self) -> str:  # never the key
        return f"RepoAuth({self.key_id}, ready={self.ready})"

    @classmethod
    def generate(cls) -> RepoAuth:
        return cls(secrets.token_bytes(32), ready=False)

    @property
    def key_id(self) -> str:
        return hmac.new(self.key, b"immich-stream auth key id", hashlib.sha256).hexdigest()[:16]

    def line(self) -> str:
        return LINE + base64.b64encode(self.key).decode() + ("" if self.ready else PENDING)

    def mac(self, label: str, *parts: bytes) -> str:
        h = hmac.new(self.key, b"immich-stream/v1 " + label.encode(), hashlib.sha256)
        for p in parts:
            h.update(len(p).to_bytes(8, "big"))
            h.update(p)
        return h.hexdigest()

    def check(self, label: str, given: object, *parts: bytes) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given, self.mac(label, *parts))


def parse(text: str) -> RepoAuth | None:
    """The authentication key of an identity file's text (its last such line), or None."""
    found = auth_key(text)
    return None if found is None else RepoAuth(*found)


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def add_to_identity_file(path: Path, auth: RepoAuth) -> None:
    """Write the key's line into the identity file, replacing an earlier one, atomically
    (mode 0600 from the first byte); every other line is kept as it was."""
    text = path.read_text("ascii")
    lines = [x for x in text.splitlines() if not x.strip().startswith(LINE.strip())]
    body = "\n".join([*lines, auth.line()]) + "\n"
    write_private_file(path, body)


def write_private_file(path: Path, text: str) -> None:
    """Replace an identity file atomically: mode 0600 from its first byte, never through a
    symlink, fsynced with its directory (a crash leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# -- manifests -----------------------------------------------------------------------------


class ManifestMac:
    """The MAC chain of one manifest (writer and reader alike)."""

    def __init__(self, auth: RepoAuth, snap_id: str) -> None:
        self.auth = auth
        self.snap_id = snap_id.encode()
        self.prev = b""
        self.seq = 0
        self.lines = 0
        self.ended = False
        self._block = hashlib.sha256()
        self.block_bytes = 0

    def add(self, raw: bytes) -> None:
        """A line's bytes, with its newline."""
        self._block.update(raw)
        self.block_bytes += len(raw)
        self.lines += 1

    def _mac(self, end: bool) -> str:
        return self.auth.mac(
            "manifest", self.snap_id, self.prev, self.seq.to_bytes(8, "big"), b"\1" if end else b"\0", self._digest()
        )

    def _digest(self) -> bytes:
        return self._block.digest() + self.lines.to_bytes(8, "big")

    def _next(self, mac: str) -> None:
        self.prev = mac.encode()
        self.seq += 1
        self.lines = 0
        self.block_bytes = 0
        self._block = hashlib.sha256()

    def seal_line(self, end: bool) -> bytes:
        mac = self._mac(end)
        out = json.dumps({"auth": mac, "n": self.lines, "end": end}, separators=(",", ":")).encode() + b"\n"
        self._next(mac)
        self.ended = end
        return out

    def check_line(self, raw: bytes, where: str) -> None:
        """A MAC line: it must match the block read since the last one."""
        if self.ended:
            raise ForgedError(f"{where}: lines after its last authenticated block: {_FORGED}")
        try:
            d = json.loads(raw)
            end, n, mac = d["end"], d["n"], d["auth"]
        except (ValueError, KeyError, TypeError):
            raise ForgedError(f"{where}: a damaged authentication line: {_FORGED}") from None
        if not (
            isinstance(end, bool)
            and n == self.lines
            and isinstance(mac, str)
            and hmac.compare_digest(mac.encode(), self._mac(end).encode())
        ):
            raise ForgedError(f"{where}: its MAC does not match: {_FORGED}")
        self._next(mac)
        self.ended = end


_FORGED = (
    "the repository was altered by someone without its authentication key; do not trust it, and see "
    "docs/threat-model.md"
)


def forged(what: str) -> ForgedError:
    return ForgedError(f"{what}: {_FORGED}")


def is_auth_line(raw: bytes) -> bool:
    return raw.startswith(b'{"auth":')
