"""Provider presets for `init`: each S3 provider's endpoint pattern, its default region, the
upload checksum it verifies, its part-size rules and the storage classes worth using
(docs/providers.md says the same for readers). A preset only fills settings the user left at
their default; `init` then checks them live with doctor's probes before it writes anything,
so a preset that is out of date is caught, not trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from immich_stream.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str  # `init --provider NAME`
    title: str
    endpoint: str | None  # pattern: {region} is filled in; None: AWS's own endpoints
    region: str  # the default region (init --region overrides it)
    regions: str  # the regions to choose from, as the provider names them
    checksum: str  # the upload checksum the provider verifies (the `checksum` setting)
    path_style: bool
    parts: str  # part-size rules, for the README and `init`'s summary
    storage_classes: str  # the classes worth using, and why
    needs_endpoint: bool = False  # the pattern holds what only the user knows (an account id, a host)


PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "aws",
        "AWS S3",
        None,
        "us-east-1",
        "any AWS region (eu-central-1, us-west-2, ...)",
        "sha256",
        False,
        "5 MiB to 5 GiB per part, at most 10,000 parts",
        "STANDARD; STANDARD_IA for the library (30-day minimum); DEEP_ARCHIVE only with thaw_days (restores wait hours)",
    ),
    Provider(
        "b2",
        "Backblaze B2",
        "https://s3.{region}.backblazeb2.com",
        "us-west-004",
        "the region in the bucket's endpoint (us-west-004, eu-central-003, ...)",
        "md5",
        True,
        "5 MB to 5 GB per part, at most 10,000 parts",
        "STANDARD only (one class)",
    ),
    Provider(
        "r2",
        "Cloudflare R2",
        "https://ACCOUNT_ID.r2.cloudflarestorage.com",
        "auto",
        "auto",
        "md5",
        True,
        "5 MiB to 5 GiB per part, at most 10,000 parts; every part but the last of one size (immich-stream's are)",
        "STANDARD; STANDARD_IA for the library (30-day minimum, retrieval fees)",
        needs_endpoint=True,
    ),
    Provider(
        "wasabi",
        "Wasabi",
        "https://s3.{region}.wasabisys.com",
        "us-east-1",
        "us-east-1, eu-central-1, ap-northeast-1, ...",
        "md5",
        True,
        "5 MiB to 5 GiB per part, at most 10,000 parts",
        "STANDARD only; every object is billed for at least 90 days (prune frees space, not that minimum)",
    ),
    Provider(
        "minio",
        "MinIO",
        "http://HOST:9000",
        "us-east-1",
        "us-east-1 unless the server sets MINIO_REGION",
        "sha256",
        True,
        "5 MiB to 5 GiB per part, at most 10,000 parts",
        "STANDARD (REDUCED_REDUNDANCY only where the server defines it)",
        needs_endpoint=True,
    ),
    Provider(
        "hetzner",
        "Hetzner Object Storage",
        "https://{region}.your-objectstorage.com",
        "fsn1",
        "fsn1, nbg1, hel1",
        "md5",
        True,
        "5 MiB to 5 GiB per part, at most 10,000 parts",
        "STANDARD only (one class)",
    ),
    Provider(
        "scaleway",
        "Scaleway Object Storage",
        "https://s3.{region}.scw.cloud",
        "fr-par",
        "fr-par, nl-ams, pl-waw",
        "md5",
        True,
        "5 MiB to 5 GiB per part, at most 1,000 parts: a file or dump over ~8 GiB (8 MiB parts) needs a "
        "larger --part-size",
        "STANDARD; ONEZONE_IA for the library (one zone); GLACIER only with thaw_days",
    ),
)

BY_NAME = {p.name: p for p in PROVIDERS}


def provider(name: str) -> Provider:
    try:
        return BY_NAME[name.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"--provider {name!r} is not a preset: choose one of {', '.join(BY_NAME)}, or give --endpoint-url "
            "for any other S3 server"
        ) from None


def preset_values(p: Provider, region: str | None, endpoint: str | None) -> dict[str, Any]:
    """The settings a preset sets: endpoint_url, region, path_style, checksum. `region` and
    `endpoint` are the user's, when given (they win); a pattern with a part only the user
    knows (R2's account id, MinIO's host) needs --endpoint-url."""
    region = region or p.region
    values: dict[str, Any] = {"region": region, "checksum": p.checksum, "path_style": p.path_style}
    if endpoint is not None:
        values["endpoint_url"] = endpoint
    elif p.needs_endpoint:
        raise ConfigError(
            f"{p.title}: give --endpoint-url (S3_ENDPOINT_URL), shaped {p.endpoint}: it names your "
            f"{'account' if p.name == 'r2' else 'server'}"
        )
    elif p.endpoint is not None:
        values["endpoint_url"] = p.endpoint.format(region=region)
    return values


def table_rows(providers: Mapping[str, Provider] = BY_NAME) -> list[str]:
    """One line per preset: what `init --help` and docs/providers.md show."""
    return [f"{p.name:<9} {p.title:<24} {p.endpoint or '(AWS)':<42} checksum {p.checksum}" for p in providers.values()]
