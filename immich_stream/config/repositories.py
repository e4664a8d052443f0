"""Named repositories: other buckets, prefixes, endpoints and credentials a `copy` writes to
(`[repositories.NAME]` in the config file), and the settings of a command pointed at one
(`--repo NAME`).

Their credentials are never in the config file, as the main repository's are not: an access
key id and a secret come from the environment variables the table names
(`access_key_id_env`, `secret_access_key_env`), else from IMMICH_STREAM_REPO_<NAME>_ACCESS_KEY_ID
and IMMICH_STREAM_REPO_<NAME>_SECRET_ACCESS_KEY, else the AWS credential chain (the same as the
main repository's). They reach the S3 client through Settings.credentials, which is never
printed or logged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immich_stream.config.parse import (
    parse_bool,
    parse_bucket,
    parse_endpoint,
    parse_identity_path,
    parse_prefix,
    parse_recipients,
    parse_region,
    parse_storage_class,
)
from immich_stream.errors import ConfigError

if TYPE_CHECKING:
    from immich_stream.config.settings import Settings

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Target:
    """A named repository (`[repositories.NAME]`)."""

    name: str
    bucket: str
    prefix: str = "immich-backup"
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool | None = None  # None: the main repository's
    storage_class: str | None = None
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    # its own age keys, when it is encrypted to others than the main repository's (copy
    # re-seals for them); None: the main repository's [encryption]
    identity_file: Path | None = None
    recipients: tuple[str, ...] = ()

    def env_names(self) -> tuple[str, str]:
        """The two variables its credentials come from."""
        base = f"IMMICH_STREAM_REPO_{self.name.upper().replace('-', '_')}_"
        return (
            self.access_key_id_env or base + "ACCESS_KEY_ID",
            self.secret_access_key_env or base + "SECRET_ACCESS_KEY",
        )


_PARSERS: dict[str, Any] = {
    "bucket": parse_bucket,
    "prefix": parse_prefix,
    "endpoint_url": parse_endpoint,
    "region": parse_region,
    "path_style": parse_bool,
    "storage_class": parse_storage_class,
    "identity_file": parse_identity_path,
    "recipients": parse_recipients,
}
_SECRETS = ("access_key_id", "secret_access_key", "aws_access_key_id", "aws_secret_access_key", "secret", "password")


def parse_repositories(path: Path, table: Any) -> dict[str, Target]:
    """The [repositories.NAME] tables of the config file, each checked (a ConfigError names
    the first problem and what to do)."""
    where = f"config file {path}: [repositories"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}] must hold tables [repositories.NAME]: write [repositories.offsite] bucket = ...")
    out: dict[str, Target] = {}
    for name, body in table.items():
        if not NAME.fullmatch(name):
            raise ConfigError(
                f"{where}.{name}]: a repository name is 1-32 lower-case letters, digits, - or _ (e.g. offsite)"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{where}] {name} is not a table: write [repositories.{name}] with bucket = ... under it")
        values: dict[str, Any] = {"name": name}
        for key, value in body.items():
            if key in _SECRETS:
                secret = "secret" in key or key == "password"
                var = "secret_access_key_env" if secret else "access_key_id_env"
                default = Target(name, "").env_names()[1 if secret else 0]
                raise ConfigError(
                    f"{where}.{name}] {key}: secrets never go in the config file: put it in an environment "
                    f"variable and name that with {var} (or set {default})"
                )
            if key in ("access_key_id_env", "secret_access_key_env"):
                if not isinstance(value, str) or not ENV_NAME.fullmatch(value):
                    raise ConfigError(
                        f"{where}.{name}] {key}: give the name of an environment variable, e.g. B2_KEY_ID"
                    )
                values[key] = value
                continue
            parse = _PARSERS.get(key)
            if parse is None:
                import difflib

                keys = [*_PARSERS, "access_key_id_env", "secret_access_key_env"]
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                raise ConfigError(
                    f"{where}.{name}] unknown key {key!r}: {hint}the keys are {', '.join(keys)} (docs/configuration.md)"
                )
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"{where}.{name}] {key} is empty: give a value, or remove it")
            try:
                values[key] = parse(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}.{name}] {key} is invalid: {exc}") from None
        if isinstance(values.get("identity_file"), Path) and not values["identity_file"].is_absolute():
            values["identity_file"] = path.parent / values["identity_file"]
        if "recipients" in values and "identity_file" not in values:
            raise ConfigError(f"{where}.{name}] recipients needs identity_file (its own keys): add it, or drop them")
        if "bucket" not in values:
            raise ConfigError(f'{where}.{name}] has no bucket: add bucket = "..." (the destination\'s S3 bucket)')
        if ("access_key_id_env" in values) != ("secret_access_key_env" in values):
            raise ConfigError(
                f"{where}.{name}] names only one of access_key_id_env and secret_access_key_env: name both"
            )
        out[name] = Target(**values)
    return out


def parse_names(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'offsite', 'offsite,b2', or a list of them (TOML, repeated flags) -> the names, each once."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{value!r} is not a list of repository names: write offsite, or a list of names")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a repository name")
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            if not NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a repository name (lower-case letters, digits, - or _)")
            if name not in names:
                names.append(name)
    return tuple(names)


def target(settings: Settings, name: str, what: str = "--repo") -> Target:
    """The named repository, or a ConfigError saying where to declare it."""
    found = settings.repositories.get(name)
    if found is None:
        known = ", ".join(sorted(settings.repositories)) or "none are declared"
        where = settings.config_file or "the config file"
        raise ConfigError(
            f"{what} {name}: no [repositories.{name}] in {where} ({known}): declare it with bucket, prefix, "
            "endpoint_url (docs/configuration.md)"
        )
    if what != "--repo" and (found.bucket, found.endpoint_url) == (settings.bucket, settings.endpoint_url):
        a, b = found.prefix, settings.prefix
        if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
            # the same objects, or this repository's prune would take the other's for garbage
            raise ConfigError(
                f"{what} {name}: [repositories.{name}] is {found.bucket}/{a}, "
                f"{'which is' if a == b else 'nested with'} this repository ({settings.bucket}/{b}): "
                "give it a prefix outside this one (or another bucket)"
            )
    return found


def credentials(t: Target, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The target's access key id and secret from the environment; None: the AWS credential
    chain. Only one of the two set is an error (naming the variables, never a value)."""
    key_var, secret_var = t.env_names()
    key, secret = environ.get(key_var, ""), environ.get(secret_var, "")
    if key and secret:
        return key, secret
    if t.access_key_id_env or key or secret:
        missing = secret_var if key else key_var
        raise ConfigError(
            f"repository {t.name}: {missing} is not set (its credentials are {key_var} and {secret_var}): "
            "set both in the environment"
        )
    return None


def pointed_at(settings: Settings, name: str, environ: Mapping[str, str], what: str = "--repo") -> Settings:
    """The settings of a command run against the named repository instead of the main one:
    its bucket, prefix, endpoint, region, storage class and credentials; everything else
    (encryption identity, transfer, locks) is the same."""
    t = target(settings, name, what)
    changed: dict[str, Any] = {
        "bucket": t.bucket,
        "prefix": t.prefix,
        "endpoint_url": t.endpoint_url,
        "region": t.region,
        "credentials": credentials(t, environ),
        "repository_name": name,
        "sources": dict(settings.sources),
    }
    if t.path_style is not None:
        changed["path_style"] = t.path_style
    if t.storage_class is not None:
        changed["storage_class"] = t.storage_class
        changed["storage_class_library"] = changed["storage_class_postgres"] = None
    for key in ("bucket", "prefix", "endpoint_url", "region", "path_style", "storage_class"):
        changed["sources"][key] = f"[repositories.{name}]"
    if t.identity_file is not None:
        changed["age_identity"], changed["age_recipients"] = t.identity_file, t.recipients
        changed["sources"]["age_identity"] = f"[repositories.{name}] identity_file"
    # SSE-C keys and KMS key ids are the main bucket's
    changed["sse_c_key_file"] = changed["sse_kms_key_id"] = changed["sse"] = None
    # so is Object Lock from the config file or the environment (copy writes the named one
    # without it, and prune --repo would refuse its bucket); a --lock-days flag is for this one
    if not settings.sources.get("lock_days", "").startswith("flag"):
        changed["lock_days"] = 0
    return dataclasses.replace(settings, **changed)
