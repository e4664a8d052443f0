"""The age file format (age-encryption.org/v1), X25519 recipients only, streamed.

Every object of an encrypted repository is a standalone age file: `age -d -i key.txt`
opens it without this program. The primitives are the `cryptography` package's (X25519,
HKDF-SHA256, HMAC-SHA256, ChaCha20-Poly1305); this module only frames them as the spec
(https://age-encryption.org/v1) says:

    age-encryption.org/v1
    -> X25519 <ephemeral share, base64>
    <the file key wrapped for that recipient, base64>
    ...one stanza per recipient...
    --- <HMAC of the header, base64>
    <16-byte nonce><payload: 64 KiB chunks, each ChaCha20-Poly1305 with a 16-byte tag>

A chunk's nonce is its 11-byte big-endian counter and a final flag, so a truncated or
reordered file fails authentication, and the last chunk must be known when it is sealed:
the Encryptor holds back the last chunk of what it was given until it learns whether more
follows (push(final=True) or finish()).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from immich_stream.config.keys import bech32_encode, identity_file_keys, identity_key, read_age_keys, recipient_key
from immich_stream.errors import RepoError
from immich_stream.repository.auth import RepoAuth

INTRO = b"age-encryption.org/v1\n"
CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = CHUNK + TAG
NONCE = 16  # the payload nonce after the header
X25519_LABEL = b"age-encryption.org/v1/X25519"
STANZA_BYTES = len(b"-> X25519 ") + 43 + 1 + 43 + 1  # share line and body line of one recipient
FOOTER_BYTES = len(b"--- ") + 43 + 1
MAX_HEADER = 64 * 1024  # a header this long is not one we (or age) wrote for a few recipients
_ZERO_NONCE = bytes(12)


class DecryptError(RepoError):
    """Ciphertext that does not open: damaged, truncated, not age, or for other recipients
    (a damaged repository, as a wrong sha256 is)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message  # what is wrong, without the object's name


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    """age's canonical base64: standard alphabet, no padding; anything else is refused."""
    if b"=" in text or b"\r" in text:
        raise DecryptError("not canonical base64")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise DecryptError("not base64") from None
    if _b64(data) != text:
        raise DecryptError("not canonical base64")
    return data


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


# -- keys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    public: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> Recipient:
        return cls(recipient_key(text))

    def __str__(self) -> str:
        return bech32_encode("age", self.public)

    def stanza(self, file_key: bytes) -> bytes:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(self.public))
        wrap = _hkdf(shared, share + self.public, X25519_LABEL)
        body = ChaCha20Poly1305(wrap).encrypt(_ZERO_NONCE, file_key, None)
        return b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"


class Identity:
    """An X25519 identity (AGE-SECRET-KEY-1...). Never printed: repr shows its recipient."""

    def __init__(self, secret: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(secret)
        pub = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.recipient = Recipient(pub)

    @classmethod
    def generate(cls) -> Identity:
        return cls(secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str) -> Identity:
        return cls(identity_key(text))

    def secret_text(self) -> str:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return bech32_encode("age-secret-key-", raw).upper()

    def __repr__(self) -> str:
        return f"Identity({self.recipient})"

    def unwrap(self, share: bytes, body: bytes) -> bytes | None:
        """The file key from an X25519 stanza addressed to this identity, else None."""
        if len(share) != 32 or len(body) != 32:
            raise DecryptError("malformed X25519 stanza")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:  # an all-zero shared secret: a malicious share
            raise DecryptError("malformed X25519 stanza") from None
        wrap = _hkdf(shared, share + self.recipient.public, X25519_LABEL)
        try:
            return ChaCha20Poly1305(wrap).decrypt(_ZERO_NONCE, body, None)
        except InvalidTag:
            return None


def read_identity_file(path: Path) -> list[Identity]:
    """The identities of an age identity file (its checks: config/keys.py)."""
    return [Identity(secret) for secret in identity_file_keys(path)]


def identity_file_text(identities: list[Identity], comments: list[str], auth: RepoAuth | None = None) -> str:
    lines = [f"# {c}" for c in comments]
    for ident in identities:
        lines.append(f"# public key: {ident.recipient}")
        lines.append(ident.secret_text())
    if auth is not None:
        lines.append(auth.line())
    return "\n".join(lines) + "\n"


# -- the format ------------------------------------------------------------------------------


def header_size(recipients: int) -> int:
    return len(INTRO) + STANZA_BYTES * recipients + FOOTER_BYTES


def sealed_size(plain: int, recipients: int) -> int:
    """Bytes of an age file of `plain` bytes for that many X25519 recipients."""
    chunks = max(1, -(-plain // CHUNK))
    return header_size(recipients) + NONCE + plain + TAG * chunks


def plain_size(stored: int, recipients: int) -> int | None:
    """The plaintext bytes of an age file of `stored` bytes for that many X25519
    recipients (sealed_size's inverse), None when no plaintext gives that size."""
    body = stored - header_size(recipients) - NONCE  # plaintext plus a tag per chunk
    if body < TAG:
        return None
    plain = body - TAG * max(1, -(-body // SEALED_CHUNK))
    return plain if plain >= 0 and sealed_size(plain, recipients) == stored else None


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class Encryptor:
    """One age file, given plaintext in pieces. The output is the file's bytes in order;
    each push() returns every chunk it can seal, holding back the last one (whole or not)
    until push(final=True) or finish() says it is the last."""

    def __init__(self, recipients: list[Recipient]) -> None:
        file_key = secrets.token_bytes(16)
        head = INTRO + b"".join(r.stanza(file_key) for r in recipients) + b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), head, hashlib.sha256).digest()
        nonce = secrets.token_bytes(NONCE)
        self._pending = head + b" " + _b64(mac) + b"\n" + nonce
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._counter = 0
        self._held = b""
        self.done = False

    def _seal(self, chunk: bytes | memoryview, final: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._counter, final), chunk, None)
        self._counter += 1
        return out

    def push(self, data: bytes, final: bool = False) -> bytes:
        if self.done:
            raise ValueError("the age file was already finished")
        out = [self._pending]
        self._pending = b""
        view = memoryview(data)
        held = self._held
        if held and len(held) < CHUNK and view:  # top the held chunk up first (no copy of data)
            take = CHUNK - len(held)
            held, view = held + bytes(view[:take]), view[take:]
        # the stream is now `held` (at most one chunk) followed by `view`
        keep = 0 if final else ((len(view) - 1) % CHUNK + 1 if view else len(held))
        pieces: list[bytes | memoryview] = [held] if held else []
        pieces += [view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]
        if keep:
            self._held = bytes(pieces.pop())
        else:
            self._held = b""
        if final and not pieces:  # only an empty file's one chunk is empty
            pieces = [b""]
        for i, piece in enumerate(pieces):
            out.append(self._seal(piece, final and i == len(pieces) - 1))
        self.done = final
        return b"".join(out)

    def finish(self) -> bytes:
        """The rest of the file (the held chunk, sealed as the last); b"" when done."""
        return b"" if self.done else self.push(b"", final=True)


def seal(data: bytes, recipients: list[Recipient]) -> bytes:
    return Encryptor(recipients).push(data, final=True)


class Decryptor:
    """One age file, given its bytes in pieces in order: feed() returns the plaintext it
    can authenticate so far (a chunk is held until the next byte shows it was not the
    last); finish() checks the file ended where its last chunk said. Raises DecryptError."""

    def __init__(self, identities: list[Identity]) -> None:
        self._identities = identities
        self._buf = bytearray()
        self._aead: ChaCha20Poly1305 | None = None
        self._counter = 0
        self._tail = bytearray()  # the chunk begun in an earlier piece (SEALED_CHUNK once used)
        self._tlen = 0
        self.plain = 0  # plaintext bytes returned

    @property
    def has_header(self) -> bool:
        """The header was read, and one of the identities opened it."""
        return self._aead is not None

    def _header(self, buf: bytes | bytearray) -> int:
        """Read the header at the start of buf: its length with the payload nonce (0 while
        buf holds only part of it)."""
        end = buf.find(b"\n--- ")
        if len(buf) >= len(INTRO) and not buf.startswith(INTRO):
            raise DecryptError("not an age file (no age-encryption.org/v1 header)")
        # judged by where the closing line starts, not by how much is buffered: the same
        # file opens or not whatever pieces it arrives in
        if end > MAX_HEADER or (end < 0 and len(buf) > MAX_HEADER + 4):
            raise DecryptError("the age header is longer than 64 KiB (hundreds of recipients): not one written here")
        if end < 0:
            return 0
        eol = buf.find(b"\n", end + 1)
        if eol < 0 or len(buf) < eol + 1 + NONCE:
            return 0
        header = bytes(buf[: eol + 1])
        if not header.startswith(INTRO):
            raise DecryptError("not an age file (no age-encryption.org/v1 header)")
        lines = header[len(INTRO) : end + 1].split(b"\n")[:-1]
        mac = _unb64(header[end + 5 : eol])
        file_key = self._file_key(lines)
        want = hmac.new(_hkdf(file_key, b"", b"header"), header[: end + 4], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            raise DecryptError("the age header's MAC does not match: the header was altered")
        nonce = bytes(buf[eol + 1 : eol + 1 + NONCE])
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        return eol + 1 + NONCE

    def _file_key(self, lines: list[bytes]) -> bytes:
        i = 0
        stanzas: list[tuple[list[bytes], bytes]] = []
        while i < len(lines):
            if not lines[i].startswith(b"-> "):
                raise DecryptError("malformed age header")
            args = lines[i][3:].split(b" ")
            i += 1
            body = b""
            while True:  # the body's lines are 64 columns; a shorter one ends it
                if i >= len(lines):
                    raise DecryptError("malformed age header")
                body += lines[i]
                i += 1
                if len(lines[i - 1]) < 64:
                    break
            stanzas.append((args, _unb64(body)))
        for args, body in stanzas:
            if args[0] != b"X25519":
                continue  # another kind of recipient (or grease): not ours
            if len(args) != 2:
                raise DecryptError("malformed X25519 stanza")
            share = _unb64(args[1])
            for ident in self._identities:
                key = ident.unwrap(share, body)
                if key is not None:
                    if len(key) != 16:
                        raise DecryptError("malformed file key")
                    return key
        raise DecryptError("no identity in the identity file opens it (encrypted to other recipients)")

    def _open(self, chunk: bytes | memoryview, final: bool) -> bytes:
        assert self._aead is not None
        try:
            out = self._aead.decrypt(_nonce(self._counter, final), chunk, None)
        except InvalidTag:
            raise DecryptError(f"chunk {self._counter} failed authentication: the object is damaged") from None
        if final and not out and self._counter:
            raise DecryptError("the last chunk is empty: not a valid age file")
        self._counter += 1
        self.plain += len(out)
        return out

    def _payload(self, data: bytes | memoryview) -> memoryview | None:
        """The payload bytes in data (None while the header is incomplete). The header is
        parsed from a copy of the first bytes only, not of the whole first piece."""
        view = memoryview(data)
        if self._aead is not None:
            return view
        if not self._buf:
            used = self._header(bytes(view[: MAX_HEADER + 128]))
            if used:
                return view[used:]
        self._buf += view
        used = self._header(self._buf)
        if not used:
            return None
        rest = memoryview(self._buf)[used:]
        self._buf = bytearray()
        return rest

    def _chunks(self, view: memoryview) -> tuple[list[memoryview], memoryview | None]:
        """The whole chunks so far that are certainly not the last (a byte follows them),
        and the rest to _keep() once they are opened (None: nothing to keep, the tail is
        being filled). The tail is a buffer of its own, filled in place: buffers allocated
        and freed over and over in threads cost a page fault per 4 KiB."""
        chunks = []
        if self._tlen:  # complete the chunk begun in an earlier piece; open it once more follows
            take = min(SEALED_CHUNK - self._tlen, len(view))
            self._tail[self._tlen : self._tlen + take] = view[:take]
            self._tlen += take
            view = view[take:]
            if not view:
                return [], None
            chunks.append(memoryview(self._tail))
            self._tlen = 0
        n = (len(view) - 1) // SEALED_CHUNK
        chunks += [view[i * SEALED_CHUNK : (i + 1) * SEALED_CHUNK] for i in range(n)]
        return chunks, view[n * SEALED_CHUNK :]

    def _keep(self, rest: memoryview | None) -> None:
        if rest is not None and len(rest):
            if not self._tail:
                self._tail = bytearray(SEALED_CHUNK)
            self._tail[: len(rest)] = rest
            self._tlen = len(rest)

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        view = self._payload(data)
        if view is None:
            return []
        chunks, rest = self._chunks(view)
        out = [self._open(chunk, False) for chunk in chunks]
        self._keep(rest)
        return out

    def feed_view(self, data: bytes | memoryview) -> memoryview:
        """feed(), the plaintext written into one buffer per thread that is allocated once
        and reused by every Decryptor (no bytes object per 64 KiB chunk, no join, no fresh
        memory): the view is valid until this thread's next feed_view, and the caller must
        not keep it."""
        view = self._payload(data)
        if view is None:
            return memoryview(b"")
        chunks, rest = self._chunks(view)
        if not hasattr(self._aead, "decrypt_into"):  # an older `cryptography`
            plain = b"".join(self._open(chunk, False) for chunk in chunks)
            self._keep(rest)
            return memoryview(plain)
        need = len(chunks) * CHUNK
        out = getattr(_per_thread, "out", None)
        if out is None or len(out) < need:
            out = _per_thread.out = bytearray(need)  # a new one: a view of the old may be alive
        into = memoryview(out)
        for i, chunk in enumerate(chunks):
            self._open_into(chunk, into[i * CHUNK : (i + 1) * CHUNK])
        self._keep(rest)
        return into[:need]

    def _open_into(self, chunk: memoryview, into: memoryview) -> None:
        assert self._aead is not None
        try:
            self._aead.decrypt_into(_nonce(self._counter, False), chunk, None, into)
        except InvalidTag:
            raise DecryptError(f"chunk {self._counter} failed authentication: the object is damaged") from None
        self._counter += 1
        self.plain += CHUNK

    def finish(self) -> list[bytes]:
        if self._aead is None:  # feed() read the header as soon as it was whole
            raise DecryptError("the age file ends inside its header: truncated")
        if self._tlen < TAG:
            raise DecryptError("the age file ends without its last chunk: truncated")
        out = self._open(bytes(self._tail[: self._tlen]), True)
        self._tlen = 0
        return [out] if out else []


_per_thread = threading.local()  # feed_view's output buffer


class OpenedHeader:
    """An age file's header, opened once: any run of its payload's chunks can then be
    opened alone, from a ranged read (a file in a pack, packs.py). Each chunk is
    authenticated by its index; whether it is the last one is told by which nonce opens it
    (a chunk opens under exactly one), so the file's size need not be known."""

    def __init__(self, aead: ChaCha20Poly1305, payload: int) -> None:
        self._aead = aead
        self.payload = payload  # where chunk 0 starts in the file

    @classmethod
    def parse(cls, data: bytes, identities: list[Identity]) -> OpenedHeader | None:
        """The header at the start of data; None while data holds only part of it."""
        d = Decryptor(identities)
        used = d._header(data)
        if not used:
            return None
        assert d._aead is not None
        return cls(d._aead, used)

    def span(self, start: int, end: int) -> tuple[int, int, int]:
        """(first chunk, stored start, stored end) of the chunks that hold plaintext [start, end)."""
        first, last = start // CHUNK, max(end - 1, start) // CHUNK
        return first, self.payload + first * SEALED_CHUNK, self.payload + (last + 1) * SEALED_CHUNK

    def open_chunks(self, first: int, raw: bytes) -> bytes:
        """The plaintext of the chunks in raw, the first being chunk number `first`."""
        out = []
        for i, pos in enumerate(range(0, len(raw), SEALED_CHUNK)):
            chunk, n = raw[pos : pos + SEALED_CHUNK], first + i
            try:
                out.append(self._aead.decrypt(_nonce(n, False), chunk, None))
                continue
            except InvalidTag:
                pass
            try:
                out.append(self._aead.decrypt(_nonce(n, True), chunk, None))
            except InvalidTag:
                raise DecryptError(f"chunk {n} failed authentication: the object is damaged") from None
            if pos + len(chunk) < len(raw):
                raise DecryptError(f"chunk {n} is the last, but more follows: the object is damaged")
        return b"".join(out)


def open_sealed(data: bytes, identities: list[Identity]) -> bytes:
    d = Decryptor(identities)
    return b"".join(d.feed(data) + d.finish())


@dataclass(frozen=True)
class Sealing:
    """How a Store encrypts: objects under `prefixes` (data/ and snapshots/ of the
    repository) are age files for `recipients`, opened with any of `identities`."""

    recipients: tuple[Recipient, ...]
    identities: tuple[Identity, ...]
    prefixes: tuple[str, ...]

    def applies(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    def size(self, plain: int) -> int:
        return sealed_size(plain, len(self.recipients))

    def encryptor(self) -> Encryptor:
        return Encryptor(list(self.recipients))

    def decryptor(self) -> Decryptor:
        return Decryptor(list(self.identities))

    def seal(self, data: bytes) -> bytes:
        return seal(data, list(self.recipients))


@dataclass(frozen=True)
class Keys:
    """The keys the settings name: the identity file's identities (the first is the current
    one, older ones after `key rotate`) and the extra recipients (an offline recovery key)."""

    identities: tuple[Identity, ...]
    extra: tuple[Recipient, ...]
    path: Path
    auth: RepoAuth | None = None  # the repository authentication key the file holds (auth.py)

    @property
    def recipients(self) -> tuple[Recipient, ...]:
        own = self.identities[0].recipient
        return (own, *(r for r in self.extra if r != own))


def load_keys(identity_file: Path | None, recipients: tuple[str, ...]) -> Keys | None:
    """The keys the settings name (read and checked by config/keys.py, as load() did)."""
    found = read_age_keys(identity_file, recipients)
    if found is None or identity_file is None:
        return None
    auth = None if found.auth is None else RepoAuth(*found.auth)
    return Keys(
        tuple(Identity(s) for s in found.secrets), tuple(Recipient(p) for p in found.recipients), identity_file, auth
    )
