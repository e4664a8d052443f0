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


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: str, lookup: Callable[[str], str | None]) -> str:
    """Docker compose's variable substitution (one level; defaults are taken as written)."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("bare") or m.group("name")
        found, op, arg = lookup(name), m.group("op"), m.group("arg") or ""
        empty = not found  # the ':' forms also treat an empty value as unset
        if op in (":-", "-"):
            return arg if (found is None or (op == ":-" and empty)) else found or ""
        if op in (":+", "+"):
            return "" if (found is None or (op == ":+" and empty)) else arg
        if op in (":?", "?") and (found is None or (op == ":?" and empty)):
            raise ValueError(f"${{{name}}} is required: {arg or 'set it'}")
        return found or ""

    return _INTERPOLATION.sub(sub, value)
