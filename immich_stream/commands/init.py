"""`init`: create the repository and the config file in one step (issue 27).

The provider's preset (config/providers.py) fills what the user left unset; doctor's S3
probes (checks/doctor.py) check it live before anything is written; then, encrypted by
default, the age identity (0600) and a recovery identity printed once and kept nowhere on
this machine; the repository's config.json; the config file. On a terminal it asks for what
is missing; without one it asks nothing: it takes the environment, the config file and the
flags, creates only what is missing and says what it created. A bucket/prefix that already
holds a repository is refused unless --force, which then only checks that the repository
opens with the settings given and writes the local files that are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers
from immich_stream.commands.monitor import Outcome
from immich_stream.config.providers import BY_NAME, Provider, preset_values, provider, table_rows
from immich_stream.errors import ConfigError
from immich_stream.progress import Reporter

IDENTITY_NAME = "age-identity.txt"
POLICY = {"keep_daily": 7, "keep_weekly": 5, "keep_monthly": 12}  # what the nightly `backup --prune` keeps


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser(
        "init",
        parents=[common],
        help="create the repository and the config file (encrypted unless --plaintext)",
        description="Check the bucket live (doctor's S3 probes), then create what is missing: the age identity "
        "(mode 0600) and a recovery identity shown once, the repository in the bucket, the config file. "
        "On a terminal it asks for what is not set; without one it asks nothing. Presets:\n" + "\n".join(table_rows()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--provider", metavar="NAME", help=f"a preset: {', '.join(BY_NAME)} (docs/providers.md)")
    i.add_argument(
        "--plaintext",
        action="store_true",
        help="no encryption: anyone who can read the bucket can read the photos (snapshots and doctor say so)",
    )
    i.add_argument(
        "--force",
        action="store_true",
        help="the bucket/prefix holds a repository already: check it opens with these settings and write only the "
        "missing local files (its config.json is never rewritten)",
    )


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _ask(question: str, default: str | None = None) -> str:
    hint = f" [{default}]" if default else ""
    while True:
        answer = input(f"{question}{hint}: ").strip() or (default or "")
        if answer:
            return answer


def _with(settings: cfg.Settings, values: dict[str, Any], source: str, only_defaults: bool) -> cfg.Settings:
    """Settings with `values` applied (those the user set win when only_defaults)."""
    chosen = {k: v for k, v in values.items() if not only_defaults or settings.sources.get(k, "default") == "default"}
    out = dataclasses.replace(settings, **chosen)
    out.sources = {**settings.sources, **dict.fromkeys(chosen, source)}
    return out


def _parsed(name: str, text: str) -> Any:
    try:
        return cfg.SPECS[name].parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name} {text!r}: {exc}") from None


def _prompts(args: argparse.Namespace, settings: cfg.Settings) -> cfg.Settings:
    """On a terminal: ask for the provider, the bucket and what the preset needs."""
    answers: dict[str, Any] = {}
    if args.provider is None and settings.endpoint_url is None:
        print("S3 provider presets:\n  " + "\n  ".join(table_rows()))
        args.provider = _ask("provider (or an S3 endpoint URL for any other server)", "aws")
        if "://" in args.provider:
            answers["endpoint_url"], args.provider = _parsed("endpoint_url", args.provider), None
    p = provider(args.provider) if args.provider else None
    if p is not None and settings.sources.get("region", "default") == "default":
        answers["region"] = _parsed("region", _ask(f"region ({p.regions})", p.region))
    if p is not None and p.needs_endpoint and settings.endpoint_url is None:
        answers["endpoint_url"] = _parsed("endpoint_url", _ask(f"endpoint URL ({p.endpoint})"))
    if settings.bucket is None:
        answers["bucket"] = _parsed("bucket", _ask("bucket (it must exist)"))
    if settings.sources.get("prefix", "default") == "default":
        answers["prefix"] = _parsed("prefix", _ask("prefix in the bucket", settings.prefix))
    return _with(settings, answers, "init (asked)", only_defaults=False)


def _preset(p: Provider | None, settings: cfg.Settings) -> cfg.Settings:
    if p is None:
        return settings
    user_region = settings.region if settings.sources.get("region", "default") != "default" else None
    values = preset_values(p, user_region, settings.endpoint_url)
    return _with(settings, values, f"init --provider {p.name}", only_defaults=True)


def config_target(settings: cfg.Settings) -> Path:
    """Where init writes the config file: the one named or found, else root's
    /etc/immich-stream/config.toml or the user's ~/.config/immich-stream/config.toml."""
    if settings.config_file is not None:
        return settings.config_file
    paths = cfg.default_config_paths(os.environ)
    return paths[1] if os.geteuid() == 0 and "XDG_CONFIG_HOME" not in os.environ else paths[0]


async def _probe(settings: cfg.Settings) -> tuple[list[str], cfg.Settings]:
    """doctor's S3 probes (reach, rights, clock, write/read/delete, multipart, checksums),
    without keys; a FAIL other than the repository's own row refuses before anything is written.
    A preset's sha256 checksum that this server does not verify falls back to Content-MD5."""
    from immich_stream.checks.doctor import FAIL, OK, Doctor

    doc = Doctor(dataclasses.replace(settings, age_identity=None, age_recipients=()))
    await doc.s3()
    rows = [c for c in doc.checks if c.name != "repository"]
    failed = [c for c in rows if c.status == FAIL]
    if failed:
        c = failed[0]
        raise ConfigError(f"init: {c.name}: {c.detail}; nothing was written")
    lines = [f"{c.status:<4}  {c.name}: {c.detail}" for c in rows]
    sha = next((c for c in rows if c.name == "server checks x-amz-checksum-sha256"), None)
    preset = settings.sources.get("checksum", "").startswith("init --provider")
    if preset and settings.checksum == "sha256" and sha is not None and sha.status != OK:
        settings = _with(settings, {"checksum": "md5"}, "init (the server does not verify sha256)", False)
        lines.append("checksum: md5 (Content-MD5), as this server does not verify x-amz-checksum-sha256")
    return lines, settings


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def config_text(settings: cfg.Settings) -> str:
    """The config file init writes: the connection, the nightly run's retention (`backup
    --prune` of the systemd unit needs one), the encryption. Credentials stay in the
    environment (AWS chain), never in this file."""
    s = settings
    sections: dict[str, dict[str, Any]] = {"immich": {}, "s3": {}, "prune": {}, "encryption": {}}
    if s.immich_dir is not None:
        sections["immich"]["dir"] = str(s.immich_dir)
    sections["s3"]["bucket"] = s.bucket
    sections["s3"]["prefix"] = s.prefix
    for name in ("endpoint_url", "region"):
        if getattr(s, name) is not None:
            sections["s3"][name] = getattr(s, name)
    if s.path_style:
        sections["s3"]["path_style"] = True
    if s.checksum != "md5":
        sections["s3"]["checksum"] = s.checksum
    chosen = {k: getattr(s, k) for k in cfg.SPECS if k.startswith("keep_") and getattr(s, k)}
    sections["prune"] = chosen or dict(POLICY)
    if s.age_identity is not None:
        sections["encryption"]["identity_file"] = str(s.age_identity)
        if s.age_recipients:
            sections["encryption"]["recipients"] = list(s.age_recipients)
    lines = [
        "# written by `immich-stream init`; every key: `immich-stream config`, docs/configuration.md",
        "# S3 credentials: the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, e.g. /etc/immich-stream/env)",
    ]
    for section, values in sections.items():
        if values:
            lines += ["", f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _write_config(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@dataclasses.dataclass
class Keys:
    identity: Path
    recipients: tuple[str, ...]
    recovery: str | None  # the recovery identity file's text: printed once, stored nowhere
    created: bool


def _keys(settings: cfg.Settings, target: Path) -> Keys:
    """The age identity: the one the settings name when it exists (its auth line added when
    it has none), else a new one (0600) beside the config file, with a recovery identity
    unless recipients are given (then they are the recovery)."""
    from immich_stream.repository.age import Identity, identity_file_text
    from immich_stream.repository.auth import RepoAuth, write_private_file

    path = settings.age_identity or target.parent / IDENTITY_NAME
    if path.exists():
        keys = cfg.read_age_keys(path, settings.age_recipients)
        assert keys is not None
        if keys.auth is None:  # a new repository is authenticated from its first byte
            text = path.read_text("ascii").rstrip("\n")
            write_private_file(path, f"{text}\n{RepoAuth(RepoAuth.generate().key, ready=True).line()}\n")
        return Keys(path, settings.age_recipients, None, False)
    auth = RepoAuth(RepoAuth.generate().key, ready=True)
    host = Identity.generate()
    recovery: str | None = None
    recipients = settings.age_recipients
    if not recipients:
        spare = Identity.generate()
        recipients = (str(spare.recipient),)
        recovery = identity_file_text(
            [spare], ["immich-stream recovery identity: keep it off the backed-up machine"], auth
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(
        path, identity_file_text([host], ["immich-stream identity of this host, written by `immich-stream init`"], auth)
    )
    return Keys(path, recipients, recovery, True)


def recovery_words(recovery: str, identity: Path) -> list[str]:
    body = [f"    {line}" for line in recovery.splitlines() if not line.startswith("# immich-stream recovery")]
    return [
        "",
        "RECOVERY KEY: shown this once, stored nowhere on this machine. Write it down or print it now:",
        "",
        *body,
        "",
        "Keep it away from this machine (on paper in a drawer, in a password manager). A backup is for the",
        "day this machine is lost, stolen or its disk dies, and then its key file goes with it: this key is",
        "how you open the backup on another machine. Whoever holds it can read every photo in the backup;",
        "without it or this host's key, nobody can, not even you. To restore elsewhere: save the lines above",
        "in a file (chmod 600) and set IMMICH_STREAM_AGE_IDENTITY to it. This host's key is",
        f"{identity}: `immich-stream key export --paper` prints it for paper too.",
        "",
    ]


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.repository.session import open_repo, repository_exists

    if _interactive():
        settings = _prompts(args, settings)
    p = provider(args.provider) if args.provider else None
    settings = _preset(p, settings)
    settings.require("bucket")
    if args.plaintext and (settings.age_identity is not None or settings.age_recipients):
        raise ConfigError(
            "init --plaintext, yet an age identity or recipients are set: choose one (unset "
            "IMMICH_STREAM_AGE_IDENTITY / IMMICH_STREAM_AGE_RECIPIENTS, or drop --plaintext)"
        )
    target = config_target(settings)
    where = f"s3://{settings.bucket}/{settings.prefix}"
    checks, settings = await _probe(settings)
    print("\n".join(["S3 checked live (doctor's probes):", *(f"  {c}" for c in checks)]), flush=True)
    created: list[str] = []
    recovery: str | None = None
    if await repository_exists(settings):
        if not args.force:
            raise ConfigError(
                f"a repository exists at {where}: to use it from this host, run `init --force` with its settings "
                "(and its age identity), or choose another S3_PREFIX for a new one"
            )
        async with open_repo(settings) as repo:  # it must open with these settings (its identity)
            encrypted = repo.store.sealing is not None
        print(f"kept the repository at {where} ({'encrypted' if encrypted else 'NOT encrypted'}): it opens")
    else:
        if not args.plaintext:
            keys = _keys(settings, target)
            settings = _with(
                settings, {"age_identity": keys.identity, "age_recipients": keys.recipients}, "init", False
            )
            recovery = keys.recovery
            if keys.created:
                created.append(f"age identity {keys.identity} (mode 0600)")
        async with open_repo(settings, create_for="init", new=True):
            pass
        encrypted = not args.plaintext
        kind = "encrypted (age)" if encrypted else "NOT encrypted (--plaintext)"
        created.append(f"repository {where}, {kind}")
    if target.exists():
        print(f"kept the config file {target}")
    else:
        _write_config(target, config_text(settings))
        created.append(f"config file {target}")
    for line in created:
        print(f"created {line}")
    if not created:
        print("nothing to create: everything was there")
    if encrypted:
        print(f"the age identity is {settings.age_identity}: every command needs it")
    if recovery is not None:
        assert settings.age_identity is not None
        print("\n".join(recovery_words(recovery, settings.age_identity)), flush=True)
    summary: dict[str, Any] = {
        "repository": where,
        "encrypted": encrypted,
        "config_file": str(target),
        "identity_file": str(settings.age_identity) if encrypted else None,
        "created": created,
    }
    if recovery is not None and args.json:  # --json swallows the text: the one place it is shown
        summary["recovery_identity"] = recovery
    return Outcome(0, summary)
