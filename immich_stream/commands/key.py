"""`key`: the age keys of an encrypted repository: show, rotate, reencrypt (repository/keys.py)."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, flag, transfer_options
from immich_stream.commands.monitor import plain
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    k = sub.add_parser(
        "key",
        parents=[common],
        help="the age keys of an encrypted repository: show, export, rotate, reencrypt",
        description="show: the recipients every object is encrypted to. export: this host's identity file "
        "(its keys and the authentication line), to keep a copy off the machine; --paper: the same in short "
        "groups with line numbers, to write down or print. rotate: a new identity (written first "
        "in the identity file, above the old ones, which keep opening older objects) and config.json's "
        "recipients (the identity's and IMMICH_STREAM_AGE_RECIPIENTS); --reencrypt then rewrites every "
        "object for them. reencrypt: that rewrite alone (it continues where an interrupted one stopped); "
        "afterwards the old identities can be deleted from the file.",
    )
    k.add_argument("action", choices=("show", "export", "rotate", "reencrypt"))
    k.add_argument("--paper", action="store_true", help="export: a form to write down or print (groups of 4)")
    k.add_argument("--reencrypt", action="store_true", help="rotate: rewrite every object for the new keys")
    k.add_argument(
        "--drop-recipient",
        action="append",
        default=[],
        metavar="AGE1...",
        help="rotate: stop encrypting to this recipient of the repository (repeatable); without it, a recipient "
        "IMMICH_STREAM_AGE_RECIPIENTS no longer names is refused",
    )
    k.add_argument(
        "--drop-missing-recipients",
        action="store_true",
        help="rotate: drop every recipient of the repository that IMMICH_STREAM_AGE_RECIPIENTS no longer names",
    )
    flag(k, "lock_wait")
    transfer_options(k)


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    from immich_stream.repository import keys

    if args.action == "export":
        return _export(settings, args.paper)
    if args.action == "show":
        report = await keys.show(settings)
    elif args.action == "rotate":
        report = await keys.rotate(
            settings, reporter, args.reencrypt, tuple(args.drop_recipient), args.drop_missing_recipients
        )
    else:
        report = await keys.reencrypt(settings, reporter)
    print("\n".join(keys.summary_lines(report)), flush=True)
    result: dict[str, Any] = plain(report)
    return result


def paper_lines(text: str) -> list[str]:
    """An identity file as it goes on paper: each secret key (bech32: case does not matter, a
    typo fails its checksum) and the authentication key (as hex) in numbered groups of 4."""
    from immich_stream.config.keys import AUTH_LINE, auth_key

    out = [
        "immich-stream identity, paper form. To type it back: one AGE-SECRET-KEY-1 line per key, the groups",
        "joined without spaces; then a line `# immich-stream-auth: ` followed by the hex digits of `auth`.",
    ]
    n = 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-1"):
            n += 1
            body = line[len("AGE-SECRET-KEY-1") :]
            groups = [body[i : i + 4] for i in range(0, len(body), 4)]
            out.append(f"key {n}: AGE-SECRET-KEY-1")
            out += [f"  {r + 1:>2}  {' '.join(groups[r * 6 : r * 6 + 6])}" for r in range((len(groups) + 5) // 6)]
        elif line.startswith(AUTH_LINE.strip()):
            found = auth_key(line)
            assert found is not None
            digits = found[0].hex()
            groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
            out.append("auth (# immich-stream-auth: followed by these 64 hex digits)")
            out += [f"  {r + 1:>2}  {' '.join(groups[r * 8 : r * 8 + 8])}" for r in range(2)]
    return out


def _export(settings: cfg.Settings, paper: bool) -> dict[str, Any]:
    """This host's identity file, checked (mode 0600, every key parses) before it is printed."""
    from immich_stream.errors import ConfigError

    path = settings.age_identity
    if path is None:
        raise ConfigError("key export: no age identity is set (IMMICH_STREAM_AGE_IDENTITY): the repository is plain")
    cfg.read_age_keys(path, ())
    text = path.read_text("ascii")
    print("\n".join(paper_lines(text)) if paper else text.rstrip("\n"), flush=True)
    return {"identity_file": str(path)}
