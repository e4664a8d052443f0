"""What the settings read from Immich's own .env (UPLOAD_LOCATION, DB_* ...), read as docker
compose reads it, and compose's interpolation (config/compose.py reads the compose files).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from immich_stream.errors import ConfigError


def read_dotenv(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Immich's .env as docker compose reads it: python-dotenv's parser (quotes, escapes,
    `export`, comments, values over several lines), then compose's interpolation of
    unquoted and double-quoted values: `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:+alt}`, `${VAR:?error}`, `$$`; the environment first, then the file's earlier
    values (compose-go's order). A line compose would refuse is a ConfigError naming it."""
    from dotenv.parser import parse_stream

    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): check its permissions") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # never echo the line: it may hold a password
            raise ConfigError(
                f"{path} line {binding.original.line} is not KEY=VALUE as docker compose reads it: fix that line "
                "(quote a value with spaces or #)"
            )
        if binding.key is None or binding.value is None:
            continue  # a comment, a blank line, or a bare KEY (compose takes it from the environment)
        raw = binding.original.string.partition("=")[2].lstrip()
        if raw.startswith("'"):  # single quotes: taken literally, as compose does
            values[binding.key] = binding.value
            continue

        def lookup(name: str) -> str | None:
            return environ[name] if name in environ else values.get(name)

        try:
            values[binding.key] = interpolate(binding.value, lookup)
        except ValueError as exc:
            raise ConfigError(f"{path} line {binding.original.line}: {binding.key}: {exc}") from None
    return values


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+?])(?P<arg>.*))?", re.DOTALL)


def _closing(value: str, start: int) -> int:
    """The index of the `}` that closes the `${` before `start` (nested `${...}` skipped), or -1."""
    depth, i = 1, start
    while i < len(value):
        if value.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if value[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def interpolate(value: str, lookup: Callable[[str], str | None], depth: int = 0) -> str:
    """Docker compose's variable substitution, a default or alternative itself substituted
    (`${UPLOAD_LOCATION:-${BASE}/library}`, as compose-go does); what is not a reference is
    kept as written."""
    out: list[str] = []
    i = 0
    while i < len(value):
        j = value.find("$", i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        if value.startswith("$$", j):
            out.append("$")
            i = j + 2
            continue
        if (bare := _NAME.match(value, j + 1)) is not None:
            out.append(lookup(bare.group()) or "")
            i = bare.end()
            continue
        end = _closing(value, j + 2) if value.startswith("${", j) else -1
        m = _BRACED.fullmatch(value, j + 2, end) if end > 0 else None
        if m is None or depth > 16:
            out.append("$")
            i = j + 1
            continue
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        found = lookup(name)
        empty = not found  # the ':' forms also treat an empty value as unset
        if op in (":-", "-") and (found is None or (op == ":-" and empty)):
            out.append(interpolate(arg, lookup, depth + 1))
        elif op in (":+", "+"):
            out.append("" if (found is None or (op == ":+" and empty)) else interpolate(arg, lookup, depth + 1))
        elif op in (":?", "?") and (found is None or (op == ":?" and empty)):
            raise ValueError(f"${{{name}}} is required: {interpolate(arg, lookup, depth + 1) or 'set it'}")
        else:
            out.append(found or "")
        i = end + 1
    return "".join(out)
