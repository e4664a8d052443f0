"""`doctor`: check, in order, everything a backup needs, and what the S3 server really
verifies; print a table of what works and what to change. Exit 0 only when a backup
would work (warnings allowed).

Every probe object lives under <prefix>/doctor/<random>/ and is removed again, also when
doctor is interrupted (a bounded cleanup in a finally); probes older than the lock stale
threshold that a killed doctor left are removed by the next doctor. With a key that cannot
delete (the rights check says so) the probes live under <prefix>/doctor/host-<host>/,
overwritten by each doctor of this host, and prune removes them. The repository itself
is only read."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from immich_stream import cleanup
from immich_stream.backup.changes import MARKER, MARKER_DIRS
from immich_stream.config import Settings, format_size, min_part_size, storage_class_for
from immich_stream.errors import ImmichStreamError, StoreError
from immich_stream.repository.age import load_keys

if TYPE_CHECKING:
    from immich_stream.s3.store import Store

OK, WARN, FAIL, SKIP = "ok", "WARN", "FAIL", "skip"
SKEW_WARN = 60.0
SKEW_FAIL = 15 * 60.0  # S3 refuses requests signed further off


@dataclass
class Check:
    name: str
    status: str
    detail: str


# A name with what S3 servers have mangled or refused: a backslash (SeaweedFS: "/"), a '%'
# that looks like an escape, a control character, a byte that is not UTF-8, spaces and
# Unicode. Its key is built as a file's would be (repo.key_path).
ODD_NAME = b"odd \\ name %41 \x01\xff \xc3\xbc\xe5\x86\x99.jpg"


class Doctor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.checks: list[Check] = []
        # the server's clock (from the clock probe) and when it was read (monotonic)
        self._server_time: tuple[dt.datetime, float] | None = None

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    async def probe(self, name: str, fn: Callable[[], Awaitable[tuple[str, str]]]) -> bool:
        """Run one check; an error of ours becomes a FAIL row with its message."""
        try:
            status, detail = await fn()
        except ImmichStreamError as exc:
            self.add(name, FAIL, str(exc))
            return False
        self.add(name, status, detail)
        return status != FAIL

    # -- local ------------------------------------------------------------------------------

    def config(self) -> None:
        s = self.settings
        missing = [n for n in ("bucket", "library_dir") if getattr(s, n) is None]
        if s.stop == "all" and s.postgres_dir is None and s.postgres_volume is None:
            missing.append("postgres_dir")
        if missing:
            self.add("configuration", FAIL, f"not set: {', '.join(missing)} (see `immich-stream config`)")
        else:
            self.add("configuration", OK, f"config file {s.config_file or '(none)'}; stop: {s.stop}")
        if s.storage_class or s.storage_class_library or s.storage_class_postgres or s.sse or s.sse_c_key_file:
            lib, pg = storage_class_for(s, "library") or "STANDARD", storage_class_for(s, "postgres") or "STANDARD"
            sse = (
                f"SSE {s.sse}"
                if s.sse
                else "SSE-C (every command needs the key file)"
                if s.sse_c_key_file
                else "no SSE"
            )
            archived = " (restores wait for thaws)" if {lib, pg} & {"GLACIER", "DEEP_ARCHIVE"} else ""
            self.add("storage class, encryption", OK, f"library {lib}, postgres {pg}{archived}; {sse}")

    def directories(self) -> None:
        s = self.settings
        for name in ("library_dir", "postgres_dir"):
            if getattr(s, name) is None:
                continue
            try:
                path = s.require_dir(name)
            except ImmichStreamError as exc:
                self.add(name, FAIL, str(exc))
                continue
            if name == "library_dir":
                missing = [d for d in MARKER_DIRS if not (path / d / MARKER).is_file()]
                if missing:
                    self.add(
                        "Immich markers",
                        FAIL if len(missing) == len(MARKER_DIRS) else WARN,
                        f"no {MARKER} in {', '.join(missing)} under {path}: is this UPLOAD_LOCATION, and mounted?",
                    )
                else:
                    self.add("Immich markers", OK, f"{MARKER} in all of {', '.join(MARKER_DIRS)}")
            elif not os.path.lexists(path / "PG_VERSION"):
                self.add(
                    name,
                    FAIL,
                    f"{path} has no PG_VERSION: it is not a Postgres data directory; set DB_DATA_LOCATION "
                    "(or POSTGRES_DIR) to the one the database container mounts",
                )
                continue
            elif not os.access(path / "PG_VERSION", os.R_OK):
                self.add(name, FAIL, f"{path}/PG_VERSION is not readable: the cold copy needs root (or use --stop app)")
                continue
            self.add(name, OK, str(path))

    async def docker(self) -> bool:
        """Docker and the containers (and Immich's own dump job): False when Docker is out of reach."""
        from immich_stream.host.stack import Stack, connect, find_containers, postgres_volume_dir

        s = self.settings

        async def check() -> tuple[str, str]:
            async with connect(s.tuning.docker_deadline) as docker:
                await find_containers(docker, s)
                stack = Stack(docker, s.project, s.db_container)
                containers = await stack.preflight()
            running = sum(1 for c in containers if c.running)
            return OK, f"project {s.project}: {len(containers)} containers, {running} running; {s.db_container} found"

        if await self.probe("Docker and containers", check):
            if s.postgres_volume is not None and s.postgres_dir is None:

                async def volume() -> tuple[str, str]:
                    async with connect(s.tuning.docker_deadline) as docker:
                        await postgres_volume_dir(docker, s)
                    return OK, f"{s.postgres_dir} (named volume {s.postgres_volume})"

                await self.probe("postgres_dir", volume)

            async def dumps() -> tuple[str, str]:
                from immich_stream.host.dumpjob import describe, dump_job

                async with connect(s.tuning.docker_deadline) as docker:
                    info = await dump_job(docker, s.db_container, s.db_user, s.db_name, s.library_dir)
                return OK, describe(info, "backups" in s.exclude)

            await self.probe("Immich's own database dumps", dumps)
            return True
        return False

    async def externals(self) -> None:
        """Immich's external libraries: one line each, with the size of what a backup reads."""
        from immich_stream.backup.externals import discover, missing
        from immich_stream.backup.library import count_files
        from immich_stream.host.stack import connect

        s = self.settings
        if s.external == "skip":
            self.add("external libraries", SKIP, "--external skip")
            return
        try:
            async with connect(s.tuning.docker_deadline) as docker:
                found = await discover(docker, s)
        except ImmichStreamError as exc:
            self.add("external libraries", FAIL, f"cannot read them from the database: {exc}")
            return
        if not found:
            self.add("external libraries", OK, "none")
            return
        bad = FAIL if s.external == "include" else WARN
        for e in found:
            where = f"{e.library!r}: {e.path}"
            if e.host is None:
                self.add(
                    e.root, WARN, f"{where} is not mounted from the host (inside immich_server only): not backed up"
                )
            elif problem := missing(e.host):
                self.add(e.root, bad, f"{where} -> {e.host} is {problem}: is the disk or NAS mounted?")
            else:
                files, size = await count_files(e.host)
                ro = ", read-only" if e.read_only else ""
                kept = " (left out: --external warn)" if s.external == "warn" else ""
                self.add(
                    e.root,
                    OK if not kept else WARN,
                    f"{where} -> {e.host}{ro}: {files} files, {format_size(size)}{kept}",
                )

    # -- S3 ---------------------------------------------------------------------------------

    async def s3(self) -> None:
        from immich_stream.repository.layout import Layout
        from immich_stream.repository.locks import list_locks, server_now
        from immich_stream.repository.repo import Repo
        from immich_stream.s3.options import StoreOptions
        from immich_stream.s3.store import Store

        s = self.settings
        if s.bucket is None:
            self.add("S3", SKIP, "no bucket set")
            return
        probe = secrets.token_hex(4)
        base = Layout(s.prefix).probe_key(probe, "")  # this doctor's probes: removed after, whatever happens
        async with Store(StoreOptions.from_settings(s, retries=2)) as store, self._probes_removed(store, base):
            repo = Repo(store, s.prefix, trust_bucket=s.tuning.trust_bucket)

            async def reach() -> tuple[str, str]:
                async for _ in store.list_objects(repo.repository_prefix()):
                    break
                return OK, f"bucket {s.bucket} on {s.endpoint_url or 'AWS S3'}: listed with these credentials"

            if not await self.probe("S3 reachable, credentials, bucket", reach):
                return
            if not await self.probe("the key's rights", lambda: _rights(store, repo)):
                return
            if store.append_only:  # nothing can be removed: probes of a fixed name, overwritten each time
                probe = f"host-{socket.gethostname()}"
                base = repo.probe_key(probe, "")

            async def clock() -> tuple[str, str]:
                server = await server_now(repo)
                if server is None:
                    return WARN, "the server gave no LastModified to compare with"
                self._server_time = (server, time.monotonic())
                skew = time.time() - server.timestamp()
                # LastModified has whole seconds: up to 1 s of that is rounding
                status = FAIL if abs(skew) > SKEW_FAIL else WARN if abs(skew) > SKEW_WARN else OK
                fix = ": fix this machine's clock (timedatectl set-ntp true)" if status != OK else ""
                return status, f"this machine is {skew:+.0f} s off the server's clock{fix}"

            await self.probe("clock skew", clock)
            data = secrets.token_bytes(1024)
            key = repo.probe_key(probe, "probe")

            async def roundtrip() -> tuple[str, str]:
                await store.put(key, data)
                if await store.get(key) != data:
                    return FAIL, "an object read back differs from what was written"
                listed = [o.key async for o in store.list_objects(base)]
                deleted = await store.discard([key])
                gone = not deleted or await store.head(key) is None
                if key not in listed or not gone:
                    return WARN, "listing lags behind writes and deletes (eventual consistency): prune may misjudge"
                return OK, f"write, read, list{' and delete' if deleted else ''} under {repo.probes_prefix()}"

            if not await self.probe("write, read, delete", roundtrip):
                return

            async def odd_names() -> tuple[str, str]:
                okey = repo.probe_file_key(probe, ODD_NAME)
                await store.put(okey, data)
                listed = [o.key async for o in store.list_objects(repo.probe_key(probe, "odd", ""))]
                back = await store.get(okey) if okey in listed else None
                await store.discard([okey, *listed])
                if okey not in listed or back != data:
                    where = f"listed as {listed[0]!r}" if listed else "not listed"
                    return FAIL, (
                        f"a key with a file's odd name ({okey.rsplit('/', 1)[1]!r}) was {where}: files with "
                        "such names would be missed by verify and pruned; report it with the server's name"
                    )
                raw = repo.probe_key(probe, "raw", "a\\b")
                await store.put(raw, data)
                mangled = [o.key async for o in store.list_objects(repo.probe_key(probe, "raw", ""))]
                await store.discard([raw, *mangled])
                note = (
                    "a raw \\ is kept as sent too"
                    if mangled == [raw]
                    else "a raw \\ becomes / on this server (keys escape it as %5C)"
                )
                return OK, f"a key with \\, %, a control character, non-UTF-8 and Unicode is stored exactly; {note}"

            await self.probe("odd file names", odd_names)

            async def multipart() -> tuple[str, str]:
                mkey = repo.probe_key(probe, "multipart")
                upload = await store.create_multipart(mkey)
                try:
                    etags = [await store.upload_part(mkey, upload, n, data) for n in (1, 2)]
                    await store.complete_multipart(mkey, upload, etags)
                except StoreError:
                    await store.abort_multipart(mkey, upload)
                    return OK, "multipart works; the server enforces S3's 5 MiB minimum part size"
                await store.discard([mkey])
                floor = min_part_size()
                return OK, f"multipart works; parts under 5 MiB accepted (parts used: {format_size(floor)} and up)"

            await self.probe("multipart upload", multipart)

            async def content_md5() -> tuple[str, str]:
                bad = repo.probe_key(probe, "bad-md5")
                try:
                    # the --checksum header of other bytes (Content-MD5 by default)
                    wrong, _ = await store.hashes(data + b"x", None, None)
                    await store.put(bad, data, check=wrong)
                except StoreError:
                    return OK, "a wrong Content-MD5 is refused: bytes corrupted on the way are caught"
                await store.discard([bad])
                return (
                    WARN,
                    "a wrong Content-MD5 was accepted: corruption in transit is only found by verify --read-data",
                )

            await self.probe("server checks Content-MD5", content_md5)

            async def checksum_sha256() -> tuple[str, str]:
                bad = repo.probe_key(probe, "bad-sha256")
                wrong = base64.b64encode(hashlib.sha256(data + b"x").digest()).decode()
                code = await store.probe_checksum_sha256(bad, data, wrong)  # a request the tool never sends
                if code is not None:
                    return OK, f"a wrong x-amz-checksum-sha256 is refused ({code})"
                await store.discard([bad])
                return WARN, "a wrong x-amz-checksum-sha256 was accepted (stored as given): rely on Content-MD5"

            await self.probe("server checks x-amz-checksum-sha256", checksum_sha256)

            async def repository() -> tuple[str, str]:
                if await store.head(repo.config_key()) is None:
                    if s.tuning.auto_init:  # tests: a backup creates it
                        return OK, f"no repository at {s.prefix}/ yet: the first backup creates it"
                    return FAIL, f"no repository at {repo.where()}: run `immich-stream init`, or check S3_PREFIX"
                await repo.check_config(load_keys(s.age_identity, s.age_recipients), writing=True)
                ids = await repo.snapshot_ids()
                locks = await list_locks(repo)
                held = "; ".join(lk.describe() for lk in locks) or "no locks"
                newest = f", newest {ids[-1]}" if ids else ""
                sealed = ", encrypted (age)" if repo.store.sealing is not None else ", NOT encrypted (--plaintext)"
                return OK, f"format ok{sealed}, {len(ids)} snapshots{newest}; {held}"

            await self.probe("repository", repository)
            await self.probe("versioning, Object Lock", lambda: object_lock(store, s.lock_days, s.lock_mode))

    @contextlib.asynccontextmanager
    async def _probes_removed(self, store: Store, base: str) -> AsyncIterator[None]:
        """Whatever happens inside (SIGINT and SIGTERM included), remove the probes after,
        bounded (cleanup.best_effort)."""
        try:
            yield
        finally:
            await cleanup.best_effort("remove doctor's probe objects", self._sweep(store, base))

    async def _sweep(self, store: Store, base: str) -> None:
        """Remove this doctor's probes (objects and unfinished uploads under base), and
        those of earlier doctors older than the lock stale threshold on the server's clock
        (one killed before its cleanup; a younger one may be another doctor's, running)."""
        from immich_stream.repository.layout import Layout
        from immich_stream.repository.locks import lock_stale

        if store.append_only:  # this key cannot delete: prune removes the probes
            return
        top = Layout(self.settings.prefix).probes_prefix()
        old: dt.datetime | None = None
        if self._server_time is not None:
            server, then = self._server_time
            old = server + dt.timedelta(seconds=time.monotonic() - then - lock_stale(self.settings.tuning.lock_stale))

        def gone(key: str, when: Any) -> bool:
            mine = key.startswith(base)
            return mine or (old is not None and isinstance(when, dt.datetime) and when < old)

        keys = [o.key async for o in store.list_objects(top) if gone(o.key, o.last_modified)]
        if keys:
            await store.delete(keys)
        for key, upload_id, started in await store.list_multipart(top):
            if key.startswith(top) and gone(key, started):
                await store.abort_multipart(key, upload_id)


async def _allowed(step: Awaitable[object], strict: bool = True) -> bool:
    """Whether S3 lets this key do `step`: False on AccessDenied; any other error is raised
    (strict) or is no refusal (a server that knows no upload to list or abort)."""
    from immich_stream.s3.store import DENIED

    try:
        await step
    except StoreError as exc:
        if exc.code in DENIED:
            return False
        if strict:
            raise
    return True


async def _rights(store: Store, repo: Any) -> tuple[str, str]:
    """Which of the rights a backup and prune need this key has, tried on one probe object of
    this host (a fixed name: what a key that cannot delete leaves stays one object); a key
    that cannot delete makes the store append-only (doctor's other probes are then left)."""
    key = repo.probe_key(f"host-{socket.gethostname()}", "rights")
    have = {"list": True}  # the listing before this worked
    have["put"] = await _allowed(store.put(key, b"immich-stream rights probe\n"))
    if not have["put"]:
        return FAIL, "this key cannot write (s3:PutObject): a backup needs it (README: keys that cannot delete)"
    have["get"] = await _allowed(store.get(key))
    have["abort multipart"] = await _allowed(store.abort_multipart(key, await store.create_multipart(key)), False)
    have["list uploads"] = await _allowed(store.list_multipart(key), False)
    have["delete"] = await store.can_delete(key)
    yes = [r for r in ("put", "get", "list", "abort multipart", "delete", "list uploads") if have[r]]
    no = [r for r in ("put", "get", "list", "abort multipart", "delete", "list uploads") if not have[r]]
    said = f"{', '.join(yes)}: yes" + (f"; {', '.join(no)}: no" if no else "")
    if not have["get"]:
        return FAIL, f"{said}: a backup reads what it wrote (s3:GetObject)"
    if not have["delete"]:
        return WARN, (
            f"{said}: backups work append-only (set append_only to skip the attempt); prune and unlock need "
            "another key, run elsewhere (README: keys that cannot delete)"
        )
    if no:
        return WARN, f"{said}: prune needs s3:ListBucketMultipartUploads and s3:AbortMultipartUpload"
    return OK, f"{said}: backups, prune and unlock all work with this key"


async def run_doctor(settings: Settings) -> Doctor:
    doc = Doctor(settings)
    doc.config()
    docker_ok = await doc.docker()
    doc.directories()
    if docker_ok:  # the libraries are read from the database: one FAIL line for Docker is enough
        await doc.externals()
    else:
        doc.add("external libraries", SKIP, "not checked: Docker is out of reach (above)")
    await doc.s3()
    return doc


def table(doc: Doctor) -> list[str]:
    width = max(len(c.name) for c in doc.checks)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in doc.checks]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "a backup would work" if doc.ok else "a backup would NOT work: fix the FAIL lines"
    return [*lines, f"{when}: {verdict}"]


async def object_lock(store: Any, lock_days: int, lock_mode: str) -> tuple[str, str]:
    """doctor's report of the bucket's versioning, Object Lock and default retention, and
    what they mean for --lock-days (docs/format.md, "Object Lock")."""
    from immich_stream.s3.versions import bucket_lock

    try:
        state = await bucket_lock(store)
    except StoreError as exc:
        if exc.code != "AccessDenied":
            raise
        # a backup key with the least rights (README) may not read the bucket's settings
        rights = "s3:GetBucketVersioning and s3:GetBucketObjectLockConfiguration"
        if lock_days:
            return FAIL, f"this key may not read the bucket's versioning and Object Lock: --lock-days needs {rights}"
        return SKIP, f"this key may not read the bucket's versioning and Object Lock ({rights})"
    seen = state.describe()
    if lock_days:
        if state.versioning != "Enabled" or not state.object_lock:
            return FAIL, f"{seen}: --lock-days {lock_days} needs both; backup refuses (exit 2)"
        return OK, f"{seen}: every snapshot is kept {lock_days} days after its commit ({lock_mode})"
    if state.object_lock:
        return WARN, f"{seen}: set --lock-days N so snapshots are retained and prune cleans old versions"
    if state.versioning == "Enabled":
        return WARN, f"{seen}: deletes leave old versions; a lifecycle rule must expire noncurrent versions"
    return OK, f"{seen}: snapshots can be deleted by any key that may delete (see --lock-days in the README)"
