"""Error classification and wording: which failures the retry wrapper sends again
(is_transient), and the one-line StoreError each failure ends in, saying what to check or fix
(store_error). Only the S3 layer sees botocore's and aiohttp's exceptions; what leaves it is
a StoreError (or ObjectNotFound, CredentialsMissing) from immich_stream.errors.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import xml.etree.ElementTree as ElementTree
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from immich_stream.errors import CredentialsMissing, ObjectNotFound, StoreError

if TYPE_CHECKING:
    from immich_stream.config import Settings
    from immich_stream.s3.store import Store

TRANSIENT_CODES = {
    # Not RequestTimeTooSkewed: this machine's clock is off, and no retry sets it right.
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "OperationAborted",
    "503",
    "500",
    "502",
    "504",
    # The body arrived other than it was sent (the server checked Content-MD5): the bytes
    # in memory are fine, so sending them again is the cure.
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}
TRANSIENT_BOTOCORE = (
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ConnectionError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProxyConnectionError",
)


def is_transient(exc: BaseException) -> bool:
    """An error that the same request, sent again, may not meet (the retry wrapper's test)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, BotoCoreError):
        return type(exc).__name__ in TRANSIENT_BOTOCORE or any(
            c.__name__ in TRANSIENT_BOTOCORE for c in type(exc).__mro__
        )
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


# Answers after which botocore would have followed a redirect to the bucket's region.
REDIRECT_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "307", "TemporaryRedirect"}


def error_answer(op: str, status: int, reason: str, headers: dict[str, str], body: bytes) -> ClientError:
    """The ClientError botocore raises for this answer: the S3 error Code and Message from
    the XML body, or the status code as the Code when there is none."""
    code, message = str(status), reason
    if body:
        try:
            root = ElementTree.fromstring(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or message
        except ElementTree.ParseError:
            pass
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
        },
        op,
    )


def error_code(exc: BaseException) -> str | None:
    """The S3 error Code of a ClientError (None for any other error)."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return None if code is None else str(code)
    return None


def store_error(
    what: str, exc: BaseException, *, endpoint: str | None, bucket: str, sse_c: bool, retries: int
) -> StoreError:
    """The StoreError a failed request ends in, worded for the user: what to check or fix."""
    where = endpoint or "AWS S3"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        # S3 refuses requests signed more than 15 minutes off its clock. A HEAD's 403 has
        # no body to say so, but the answer's Date header shows how far off we are.
        skew = None
        try:
            server = email.utils.parsedate_to_datetime(
                exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date", "")
            )
            skew = time.time() - server.timestamp()
        except (TypeError, ValueError):
            pass
        if code == "RequestTimeTooSkewed" or (
            code in ("403", "AccessDenied", "SignatureDoesNotMatch") and skew is not None and abs(skew) > 15 * 60
        ):
            off = f" by {abs(skew) / 60:.0f} minutes" if skew is not None and abs(skew) > 60 else ""
            return StoreError(
                f"{what}: S3 refused the request because this machine's clock is off{off} ({code}): check it "
                "with `date -u`, and enable NTP (`timedatectl set-ntp true`)"
            )
        reading = what.startswith(("download", "look up"))
        if reading and code in ("InvalidRequest", "InvalidArgument", "400", "BadRequest"):
            if not sse_c:
                return StoreError(
                    f"{what}: S3 refused to serve it ({code}): it may be encrypted with SSE-C: give its key "
                    "with --sse-c-key-file"
                )
            return StoreError(
                f"{what}: S3 refused to serve it ({code}): it may not be SSE-C encrypted, or not with the key "
                "in --sse-c-key-file"
            )
        if reading and sse_c and code in ("AccessDenied", "403"):
            return StoreError(
                f"{what}: S3 refused access ({code}): the key in --sse-c-key-file may not be the one the "
                "object was written with (or the credentials lack permission)"
            )
        if code == "InvalidObjectState":
            return StoreError(
                f"{what}: the object is archived (GLACIER/DEEP_ARCHIVE) and not thawed: restore, drill and "
                "verify --read-data thaw what they read first; run one of them"
            )
        if code == "NoSuchBucket":
            return StoreError(f"bucket {bucket!r} does not exist on {where}: create it or fix S3_BUCKET")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"):
            return StoreError(
                f"{what}: S3 refused access ({code}) on bucket {bucket!r}: check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and their permissions"
            )
        kind = ObjectNotFound if code in ("NoSuchKey", "404", "NotFound") else StoreError
        return kind(f"{what}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": "))
    if isinstance(exc, BotoCoreError) and type(exc).__name__ == "NoCredentialsError":
        return CredentialsMissing("no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if is_transient(exc):
        return StoreError(
            f"{what}: cannot reach S3 at {where} after {retries} attempts ({short(exc)}): "
            "check the endpoint URL and the network"
        )
    return StoreError(f"{what}: {short(exc)}")


def describe_credentials(settings: Settings) -> tuple[str, str]:
    """(redacted access key, where it came from): a named repository's own (--repo NAME),
    else through the normal AWS chain."""
    import botocore.session

    if settings.credentials is not None:
        key = settings.credentials[0]
        shown = key[:4] + "..." + key[-2:] if len(key) > 8 else "****"
        return (f"{shown} (secret redacted)", f"[repositories.{settings.repository_name}]: its variables")

    try:
        creds = botocore.session.Session().get_credentials()
    except Exception as exc:  # a broken profile must not break `config`
        return ("(error)", f"AWS credential chain: {short(exc)}")
    if creds is None:
        return ("(none found)", "AWS credential chain: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    key = creds.access_key or ""
    shown = key[:4] + "..." + key[-2:] if len(key) > 8 else "****"
    return (f"{shown} (secret redacted)", f"AWS credential chain: {creds.method}")


def short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


async def why_no_repository(store: Store, endpoint: str | None) -> StoreError | None:
    """Why a repository's config.json is not there, when the reason is not an empty prefix:
    the bucket does not exist, or the endpoint is no S3 server at all (a web console's port,
    a typo). One listing, asked only after the config was found missing; None when the
    bucket lists fine (then there is simply no repository)."""
    where = endpoint or "AWS S3"
    not_s3 = (
        f"{where} is not an S3 endpoint (its answer to a bucket listing is no S3 listing): check "
        "S3_ENDPOINT_URL (the S3 API's address and port, not a web console's)"
    )
    try:
        async with asyncio.timeout(60):
            listing = await store._client.list_objects_v2(Bucket=store.bucket, MaxKeys=1)
        if "Name" not in listing and "IsTruncated" not in listing:  # an HTML page parses as empty XML
            return StoreError(not_s3)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {store.bucket!r} does not exist on {where}: create it or fix S3_BUCKET")
        if not code or code.isdigit():  # no S3 error document: some other web server answered
            return StoreError(
                f"{where} is not an S3 endpoint (a bucket listing got HTTP {status} without an S3 error): "
                "check S3_ENDPOINT_URL (the S3 API's address and port, not a web console's)"
            )
    except BotoCoreError as exc:
        if "pars" in type(exc).__name__.lower() or "pars" in str(exc).lower():
            return StoreError(not_s3)
    except TimeoutError:
        pass
    return None
