"""One exception hierarchy; the CLI maps each to a documented exit code.

Every message is one line that names the problem and says what to do.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed; no snapshot was committed
EXIT_USAGE = 2  # bad command line or configuration
EXIT_INCOMPLETE = 3  # snapshot committed, but some files could not be read
EXIT_SUSPICIOUS = 4  # the library looks unmounted, empty or shrunk: refused, nothing stopped or committed
EXIT_UNSTABLE = 5  # snapshot committed, but a container did not stay running after the restart
EXIT_PRUNE_FAILED = 6  # snapshot committed, but the prune (--prune) or a copy (--copy-to) after it failed
EXIT_PARTIAL = 7  # restore finished, but some files could not be restored (each named); the rest is in place
EXIT_FORGED = 8  # what the repository says failed authentication: altered by someone without its key
EXIT_NO_REPOSITORY = 9  # no repository at the bucket/prefix: `init` creates one; nothing was touched
EXIT_THAWING = (
    75  # restore/drill/verify --no-wait: thaws of archived objects requested; run it again later (EX_TEMPFAIL)
)
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def backup_exit_code(complete: bool, unstable: bool) -> int:
    """A committed backup's exit code: a container that did not stay up outranks missing files."""
    if unstable:
        return EXIT_UNSTABLE
    return EXIT_OK if complete else EXIT_INCOMPLETE


class ImmichStreamError(Exception):
    """Base class: a failure with a one-line message for the user."""

    exit_code = EXIT_FAILED


class ConfigError(ImmichStreamError):
    """A setting is missing or invalid."""

    exit_code = EXIT_USAGE


class StoreError(ImmichStreamError):
    """S3 could not be reached or refused a request."""

    code: str | None = None  # the S3 error code, when the server gave one


class CredentialsMissing(StoreError):
    """No S3 credentials anywhere in the AWS chain: configuration, not a failed run."""

    exit_code = EXIT_USAGE


class DeleteDenied(StoreError):
    """The S3 key may not delete (AccessDenied on DeleteObject): a backup goes on append-only
    (Store.discard), while prune, unlock and doctor's cleanup need a key that may."""


class ObjectNotFound(StoreError):
    """The object asked for does not exist (NoSuchKey, or a 404 to a HEAD)."""


class StallError(ImmichStreamError):
    """Nothing moved for the stall timeout, or the stack was down longer than allowed."""


class StackError(ImmichStreamError):
    """Docker could not be reached, or a container could not be found, stopped or started."""


class DumpError(ImmichStreamError):
    """pg_dump or psql failed inside the database container."""


class RepoError(ImmichStreamError):
    """The repository in the bucket is missing, damaged or of an unknown format."""


def bytes_lost(exc: BaseException) -> bool:
    """The bytes asked for are not there as the manifest says (gone, short, damaged), as
    opposed to a server that does not answer (verify, restore and prune's repack tell them
    apart: the first is a damaged snapshot, the second a run to try again)."""
    if isinstance(exc, RepoError):
        return True
    return isinstance(exc, ObjectNotFound) or (isinstance(exc, StoreError) and exc.code in ("InvalidRange", "416"))


class NoRepository(RepoError):
    """No repository (config.json) at the bucket and prefix: refused before anything is
    stopped or written, so a typo in S3_PREFIX never starts a new, empty repository."""

    exit_code = EXIT_NO_REPOSITORY

    def __init__(self, where: str) -> None:
        super().__init__(f"no repository at {where}: run `immich-stream init`, or check S3_PREFIX")


class ForgedError(RepoError):
    """config.json, a snapshot.json or a manifest of an authenticated repository does not
    carry a valid MAC: someone who can write the bucket (but has no key) altered it."""

    exit_code = EXIT_FORGED


class SuspiciousLibrary(ImmichStreamError):
    """The library lacks Immich's marker files or lost too much since the last snapshot."""

    exit_code = EXIT_SUSPICIOUS


class LockError(ImmichStreamError):
    """Another run holds the repository (or this host's) lock."""


class ProblemsFound(ImmichStreamError):
    """restore or verify finished, but listed problems (files not restored, objects missing or corrupt)."""


class NothingMatched(ImmichStreamError):
    """restore: --root or --include selects nothing in the snapshot; nothing was written."""


class ThawPending(ImmichStreamError):
    """--no-wait: objects in GLACIER/DEEP_ARCHIVE are being thawed; the same command run later carries on."""

    exit_code = EXIT_THAWING


class AfterCommitError(ImmichStreamError):
    """The snapshot was committed; what came after it (prune, releasing the lock) failed or
    was interrupted. Never said as "nothing was committed"."""

    exit_code = EXIT_PRUNE_FAILED


class Interrupted(ImmichStreamError):
    """SIGINT or SIGTERM arrived; cleanup ran."""

    def __init__(self, signame: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signame}; cleanup ran, nothing was committed")
        self.exit_code = exit_code
