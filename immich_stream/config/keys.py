"""The key files and keys the settings name, checked when the settings are loaded (a missing,
open or damaged key is found before anything is stopped): the SSE-C key file, and age's
identity file and recipients. Here is their text (bech32, BIP 173; the identity file's lines,
its `# immich-stream-auth:` line) and the raw key bytes; the cryptography done with them is
repository/age.py's and repository/auth.py's, which read them through these functions.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from immich_stream.errors import ConfigError

SSE_C_KEY_BYTES = 32
# The repository authentication key's line in the identity file (repository/auth.py)
AUTH_LINE = "# immich-stream-auth: "
AUTH_PENDING = " pending"


# -- bech32 (BIP 173), the encoding of age's keys -----------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert(data: Iterable[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        raise ValueError("invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    five = _convert(data, 8, 5, True)
    checksum = _polymod(_hrp_expand(hrp) + five + [0] * 6) ^ 1
    five += [(checksum >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in five)


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    hrp, sep, rest = text.rpartition("1")
    if not sep or not hrp or len(rest) < 6 or any(c not in _CHARSET for c in rest):
        raise ValueError("not bech32")
    five = [_CHARSET.index(c) for c in rest]
    if _polymod(_hrp_expand(hrp) + five) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_convert(five[:-6], 5, 8, False))


# -- age keys ----------------------------------------------------------------------------------


def recipient_key(text: str) -> bytes:
    """An age recipient (age1...): its 32-byte X25519 public key."""
    try:
        hrp, data = bech32_decode(text.strip())
    except ValueError:
        hrp, data = "", b""
    if hrp != "age" or len(data) != 32:
        raise ConfigError(f"{text.strip()[:80]!r} is not an age recipient (age1... as age-keygen prints it)")
    return data


def identity_key(text: str) -> bytes:
    """An age identity line (AGE-SECRET-KEY-1...): its 32-byte X25519 secret key."""
    try:
        hrp, data = bech32_decode(text.strip())
    except ValueError:
        hrp, data = "", b""
    if hrp != "age-secret-key-" or len(data) != 32:
        raise ConfigError("an identity line is not an age X25519 secret key (AGE-SECRET-KEY-1..., from age-keygen)")
    return data


def identity_file_keys(path: Path) -> list[bytes]:
    """The secret keys of an age identity file (age-keygen's format: comments, blank lines,
    one AGE-SECRET-KEY-1 per line; the first is the current one). Refused when others than
    its owner may read it: whoever reads it reads every backup."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"age_identity {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"age_identity {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"run `chmod 600 {path}`"
            )
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"age_identity {path} does not exist: create it with `age-keygen -o {path}` (new repository) "
            "or restore the one this repository was encrypted with"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"age_identity {path} cannot be read: {exc}") from None
    keys = [identity_key(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"age_identity {path} holds no AGE-SECRET-KEY-1 line: create one with age-keygen")
    return keys


def auth_key(text: str) -> tuple[bytes, bool] | None:
    """The repository authentication key of an identity file's text (its last such line) and
    whether it is ready (not pending), or None."""
    found: tuple[bytes, bool] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith(AUTH_LINE.strip()):
            continue
        value = line[len(AUTH_LINE.strip()) :].strip()
        ready = not value.endswith(AUTH_PENDING)
        value = value.removesuffix(AUTH_PENDING).strip()
        try:  # base64, or 64 hex digits (as `key export --paper` writes it down)
            key = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(value, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(
                "the identity file's `# immich-stream-auth:` line is damaged: copy it again from `key show` "
                "(on the backup host) or from your recovery copy"
            )
        found = (key, ready)
    return found


@dataclasses.dataclass(frozen=True)
class AgeKeys:
    """The raw keys age_identity and age_recipients name (repository/age.py's Keys wraps them)."""

    secrets: tuple[bytes, ...]  # the identity file's, the current one first
    recipients: tuple[bytes, ...]  # the extra recipients' public keys
    auth: tuple[bytes, bool] | None  # the repository authentication key and whether it is ready


def read_age_keys(identity_file: Path | None, recipients: tuple[str, ...]) -> AgeKeys | None:
    """The keys the settings name, or None without encryption; a ConfigError for a missing,
    open or damaged one."""
    if identity_file is None:
        if recipients:
            raise ConfigError(
                "age recipients are set but no identity: set IMMICH_STREAM_AGE_IDENTITY (or [encryption] "
                "identity_file) to a key made with age-keygen"
            )
        return None
    secrets = tuple(identity_file_keys(identity_file))
    try:
        auth = auth_key(identity_file.read_text("ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"age_identity {identity_file} cannot be read: {exc}") from None
    return AgeKeys(secrets, tuple(recipient_key(r) for r in recipients), auth)


# -- SSE-C -------------------------------------------------------------------------------------


def read_sse_c_key(path: Path, source: str = "settings") -> bytes:
    """The SSE-C key: exactly 32 bytes, in a file only its owner may read (the key is the
    backup: whoever reads it reads every object, whoever loses it loses them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"sse_c_key_file {path} (from {source}) cannot be read ({exc.strerror}): fix the path"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"sse_c_key_file {path} (from {source}) is readable by group or others (mode "
                f"{st.st_mode & 0o777:o}): chmod 600 {path}"
            )
        key = os.read(fd, SSE_C_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != SSE_C_KEY_BYTES:
        raise ConfigError(
            f"sse_c_key_file {path} (from {source}) must hold exactly {SSE_C_KEY_BYTES} raw bytes, not "
            f"{'more' if len(key) > SSE_C_KEY_BYTES else len(key)}: make one with `head -c 32 /dev/urandom > FILE`"
        )
    return key
