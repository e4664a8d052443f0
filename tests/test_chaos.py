"""Chaos: "Immich is never left down" (issue 9), as a seeded, bounded loop.

Each iteration runs one command (backup with each `--stop` mode, prune, restore of files
or of the database) against the real test stack and a dedicated `rclone serve s3`, with
one fault drawn from the seed:

  sigkill      SIGKILL at a random moment (the next backup must start the stack first)
  sigterm2     SIGTERM at a random moment, a second one shortly after, while cleanup runs
  s3-frozen    the S3 server SIGSTOPped at a random moment, SIGCONTed after the run ended
  s3-flaky     10% of S3 requests fail through tests/faultproxy.py (500, 503, reset, slow)
  docker-stop  the Docker API answers 500 to the stop of one container (tests/dockerproxy.py)
  (on request, IMMICH_STREAM_CHAOS_FAULTS=...,sigint2,sighup2: the same twice-signalled stop
  with SIGINT or SIGHUP)

After each iteration (the invariants; a failure names the iteration, the fault and the seed):
  - every container of the stack runs (after a SIGKILL: once the next backup recovered it);
  - every snapshot committed in this iteration passes `verify ID --read-data` (and all of
    them, `verify --all --read-data`, at the end); objects are never rewritten, so a
    snapshot verified once can only break by losing objects, which the next point checks
    for every committed snapshot after every iteration;
  - no committed snapshot's manifest (or dump) references an object missing from the
    bucket (listed with boto3, not with the code under test);
  - the database still holds every row (a restore cut short must change nothing);
  - the stack ran again within the stall timeout + 30 s of the fault, and the process
    exited within 60 s after that; its exit code is one the README documents, and the
    one the fault calls for.

IMMICH_STREAM_CHAOS_SEED and IMMICH_STREAM_CHAOS_ITERATIONS choose the run; the schedule
(commands, faults, moments, which container, which requests fail) follows from the seed.
The per-iteration lines and the totals are printed (pytest -s shows them as they come).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import (
    CONTAINERS,
    KEY,
    SECRET,
    ImmichStack,
    RcloneServer,
    base_env,
    bucket_of,
    running_containers,
)
from tests.dockerproxy import DockerProxy, docker_api
from tests.faultproxy import FaultProxy, any_request
from tests.helpers import REPO_ROOT, USER_ID, Bucket, make_library, run_cli, start_cli

SEED = int(
    os.environ.get("IMMICH_STREAM_CHAOS_SEED", "5588")
)  # a seed whose 20 draws cover most (command, fault) pairs
# 10: each of the five faults twice (they are drawn in rounds), in about 3.5 minutes; a
# longer run is IMMICH_STREAM_CHAOS_ITERATIONS=40.
ITERATIONS = int(os.environ.get("IMMICH_STREAM_CHAOS_ITERATIONS", "10"))
STALL = 30.0  # IMMICH_STREAM_STALL_TIMEOUT of every run (the smallest the product accepts)
RESTART_BOUND = STALL + 30  # the stack runs again within this of the fault
EXIT_AFTER_RESTART = 60.0  # and the process has exited within this after that
GRACE = 5.0  # the test's own slack before it kills a run that went past the bound
SETTLE = 3.0  # the stack is looked at again this long after a run exited
MIB = 1024 * 1024

OPS = ("backup-all", "backup-app", "backup-none", "prune", "restore-files", "restore-db")
REQUIRED_FAULTS = ("sigkill", "sigterm2", "s3-frozen", "s3-flaky", "docker-stop")
SIGNAL_PAIRS = {"sigterm2": signal.SIGTERM, "sigint2": signal.SIGINT, "sighup2": signal.SIGHUP}
# The five of issue 9 by default; sigint2 and sighup2 (the same twice-signalled stop) on request.
FAULTS = tuple(os.environ.get("IMMICH_STREAM_CHAOS_FAULTS", ",".join(REQUIRED_FAULTS)).split(","))
STOPPING_OPS = ("backup-all", "backup-app", "restore-db")  # the commands that stop containers
KEEP_LAST = 3
DB_ROWS = "SELECT (SELECT count(*) FROM assets) || ' assets, ' || (SELECT count(*) FROM users) || ' users'"
PRISTINE = "/tmp/chaos-pristine.sql"  # inside the database container: the seeded database, for repairs


def documented_exit_codes() -> set[int]:
    """The codes of the README's exit code table (new ones count once documented there)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}


# -- the real parts ------------------------------------------------------------------------


RcloneS3 = RcloneServer


_LIST = "/containers/json?" + urllib.parse.urlencode(
    {"all": "1", "filters": json.dumps({"label": ["com.docker.compose.project=immich"]})}
)


def running_now() -> frozenset[str]:
    return frozenset(c["Names"][0].lstrip("/") for c in docker_api(_LIST) if c["State"] == "running")


class StackWatch:
    """Which containers run, every 0.2 s, from outside (the Docker API, not the CLI's view)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), running_now()))
            except (OSError, RuntimeError, ValueError):
                pass  # dockerd busy for a moment: the next sample counts
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, t0: float, t1: float) -> list[tuple[float, frozenset[str]]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def longest_down(self, t0: float, t1: float, name: str = "immich_server") -> float:
        """The longest stretch within [t0, t1] in which `name` was not running."""
        longest, since = 0.0, None
        for t, running in self.window(t0, t1):
            if name not in running:
                since = t if since is None else since
            elif since is not None:
                longest, since = max(longest, t - since), None
        if since is not None:
            longest = max(longest, t1 - since)
        return longest

    def up_again(self, t_fault: float, t_end: float) -> float | None:
        """The moment from which every container ran until t_end (t_fault if all along);
        None if they were not all running at the end."""
        up: float | None = t_fault
        for t, running in self.window(t_fault, t_end):
            up = (t if up is None else up) if set(CONTAINERS) <= running else None
        return up


# -- one run of the CLI under a fault ------------------------------------------------------


@dataclass
class Plan:
    op: str
    fault: str
    moment: float = 0.0  # fraction of the command's usual duration (signals, freeze)
    gap: float = 0.0  # seconds between the two SIGTERMs
    container: str = ""  # docker-stop: the container whose stop fails
    flaky_seed: int = 0


@dataclass
class Outcome:
    code: int | None = None
    out: str = ""
    err: str = ""
    started: float = 0.0
    ended: float = 0.0
    fault_at: float | None = None  # when the fault took effect (None: the run ended first)
    second_at: float | None = None
    killed_by_test: bool = False
    injected: dict[str, int] = field(default_factory=dict)

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("immich-stream: error:")]


def command(op: str, restore_dir: Path) -> list[str]:
    return {
        "backup-all": ["backup", "--stop", "all"],
        "backup-app": ["backup", "--stop", "app"],
        "backup-none": ["backup", "--stop", "none"],
        "prune": ["prune", "--keep-last", str(KEEP_LAST)],
        "restore-files": ["restore", "latest", "--to", str(restore_dir)],
        "restore-db": ["restore", "latest", "--database"],
    }[op]


def execute(args: list[str], env: dict[str, str], plan: Plan | None, usual: float, s3: RcloneS3) -> Outcome:
    """Start the CLI, apply the plan's fault at its moment, wait for the exit within the
    bound (killing the run past it), thaw S3 once the run ended."""
    o = Outcome()
    proc = start_cli(*args, env=env)
    o.started = time.monotonic()
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [
        threading.Thread(target=lambda: chunks["out"].append(proc.stdout.read())),  # type: ignore[union-attr]
        threading.Thread(target=lambda: chunks["err"].append(proc.stderr.read())),
    ]  # type: ignore[union-attr]
    for t in readers:
        t.start()

    def alive_until(t: float) -> bool:
        while time.monotonic() < t:
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        return proc.poll() is None

    fault = plan.fault if plan else None
    if fault in ("sigkill", "s3-frozen", *SIGNAL_PAIRS):
        assert plan is not None
        if alive_until(o.started + plan.moment * usual):
            o.fault_at = time.monotonic()
            if fault == "sigkill":
                proc.kill()
            elif fault == "s3-frozen":
                s3.freeze()
            else:
                proc.send_signal(SIGNAL_PAIRS[fault])
                if alive_until(o.fault_at + plan.gap):
                    o.second_at = time.monotonic()
                    proc.send_signal(SIGNAL_PAIRS[fault])
    elif fault in ("s3-flaky", "docker-stop"):
        o.fault_at = o.started  # in place before the run began
    base = o.fault_at if o.fault_at is not None else o.started
    limit = STALL + 30 + EXIT_AFTER_RESTART + GRACE if fault else 240
    if alive_until(base + limit):
        # Past the bound: an invariant failure, recorded by the caller. First ask the run
        # what it waits for (README: kill -USR1 prints every task's stack), for the report.
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        o.killed_by_test = True
    proc.wait()
    o.ended = time.monotonic()
    if fault == "sigkill" and proc.returncode == 0:
        # A SIGKILL that landed leaves no exit 0: the run ended on its own between the last
        # look and the kill (CI: a restore that now takes 0.8 s, killed "at 0.8 s").
        o.fault_at = None
    s3.thaw()  # after the run ended, as a frozen server that comes back would
    for t in readers:
        t.join()
    o.code = proc.returncode
    o.out, o.err = "".join(chunks["out"]), "".join(chunks["err"])
    return o


# -- what the test looks at -----------------------------------------------------------------


def committed_snapshots(bucket: Bucket) -> list[str]:
    return bucket.snapshots()


def missing_references(bucket: Bucket) -> list[str]:
    """Objects that committed snapshots need and the bucket does not hold (or holds at
    another size): the test's own reading of the format, through boto3."""
    listing = bucket.keys()
    problems = []
    for sid in committed_snapshots(bucket):
        for name in ("manifest.jsonl.gz", "database.sql.gz"):
            if f"snapshots/{sid}/{name}" not in listing:
                problems.append(f"snapshot {sid}: {name} missing")
        if f"snapshots/{sid}/manifest.jsonl.gz" not in listing:
            continue
        for line in bucket.manifest(sid):
            if line.get("type") != "file":
                continue
            # (object key, bytes of it the line needs, exact size or at least): a large
            # file's object of its own; a blob of a pack; each chunk of a data directory file
            if line.get("chunks") is not None:
                needs = [(key, offset + length, False) for key, offset, length, _size, _sha in line["chunks"]]
            elif line.get("offset") is not None:
                needs = [(line["key"], line["offset"] + line["size"], False)]
            else:
                needs = [(line["key"], line["size"], True)]
            for key, end, exact in needs:
                size = listing.get(key)
                if size is None:
                    problems.append(f"snapshot {sid}: object {key} missing ({line['root']}/{line['path']})")
                elif (size != end) if exact else (size < end):
                    problems.append(
                        f"snapshot {sid}: object {key} has {size} bytes, {line['root']}/{line['path']} needs "
                        f"{'exactly' if exact else 'at least'} {end}"
                    )
    return problems


def db_rows(stack: ImmichStack) -> str:
    try:
        return stack.psql(DB_ROWS)
    except AssertionError as exc:
        return f"(cannot query: {exc})"


def wait_no_restore_running(stack: ImmichStack, timeout: float = 60) -> None:
    """A psql a killed restore left in the container may still be at work: let it end
    before judging the database."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'psql' "
        "AND pid <> pg_backend_pid() AND datname IS NOT NULL"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stack.psql(sql, db="postgres") == "0":
                return
        except AssertionError:
            pass
        time.sleep(0.5)


def start_missing(stack: ImmichStack) -> None:
    """The test's own repair after a failed invariant, so the next iteration starts clean."""
    missing = set(CONTAINERS) - running_containers()
    if missing:
        for name in sorted(missing, key=lambda n: n != "immich_postgres"):
            docker_api(f"/containers/{name}/start", method="POST")
    stack.wait_db()


def churn(library: Path, rng: random.Random, it: int) -> None:
    """New files for the next backup (one multipart-sized), the oldest gone: each backup
    has uploads in flight for the faults to hit."""
    d = library / "library" / USER_ID / "chaos"
    d.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        (d / f"it{it:03d}-{k}.jpg").write_bytes(rng.randbytes(rng.randint(20_000, 300_000)))
    (d / f"it{it:03d}-video.mp4").write_bytes(rng.randbytes(6 * MIB + rng.randint(0, MIB)))
    files = sorted(d.iterdir())
    for old in files[:-16]:
        old.unlink()


def schedule(seed: int, n: int) -> list[Plan]:
    """Faults in shuffled rounds of all of them (each kind n/5 times with the five), commands
    in shuffled rounds of all six for every fault but docker-stop, which goes with a command
    that stops containers. Iteration i depends only on (seed, i): a shorter run with the same
    seed is a prefix of a longer one."""

    def rounds(items: tuple[str, ...], what: str) -> Iterator[str]:
        block = 0
        while True:
            yield from random.Random(f"{seed}/{what}/{block}").sample(items, len(items))
            block += 1

    faults, ops = rounds(FAULTS, "faults"), rounds(OPS, "ops")
    plans = []
    for i in range(1, n + 1):
        rng = random.Random(f"{seed}/iteration/{i}")
        fault = next(faults)
        op = rng.choice(STOPPING_OPS) if fault == "docker-stop" else next(ops)
        plan = Plan(
            op, fault, moment=rng.uniform(0.05, 1.0), gap=rng.uniform(0.05, 1.5), flaky_seed=rng.randrange(1 << 30)
        )
        if fault == "docker-stop":
            stoppable = [c for c in CONTAINERS if not (op != "backup-all" and c == "immich_postgres")]
            plan.container = rng.choice(sorted(stoppable))
        plans.append(plan)
    return plans


def repair_database() -> None:
    """Put the seeded database back (the test's own repair after a failed invariant)."""
    for cmd in (
        [
            "psql",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "DROP DATABASE IF EXISTS immich WITH (FORCE)",
        ],
        ["createdb", "-U", "postgres", "immich"],
        ["psql", "-U", "postgres", "-d", "immich", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", PRISTINE],
    ):
        proc = subprocess.run(["docker", "exec", "immich_postgres", *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"repairing the database: {' '.join(cmd[:3])} failed: {proc.stderr.strip()[-500:]}")


# -- the suite -------------------------------------------------------------------------------


@pytest.fixture
def chaos_s3(tmp_path: Path) -> Iterator[RcloneS3]:
    root = tmp_path / "s3"
    root.mkdir()
    server = RcloneS3(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.chaos
@pytest.mark.timeout(300 + ITERATIONS * (STALL + 200))
def test_chaos_immich_is_never_left_down(stack: ImmichStack, chaos_s3: RcloneS3, tmp_path: Path) -> None:
    unknown = set(FAULTS) - set(REQUIRED_FAULTS) - set(SIGNAL_PAIRS)
    assert not unknown, f"IMMICH_STREAM_CHAOS_FAULTS: unknown {sorted(unknown)}"
    plans = schedule(SEED, ITERATIONS)
    codes = documented_exit_codes() - {2}  # a usage error here would be the test's own mistake
    env = base_env(tmp_path)
    bucket_name = "chaos-" + str(SEED)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "S3_ENDPOINT_URL": chaos_s3.endpoint,
            "S3_BUCKET": bucket_name,
            "S3_PATH_STYLE": "true",
            "IMMICH_DIR": str(stack.dir),
            "IMMICH_STREAM_STALL_TIMEOUT": f"{STALL:.0f}s",
            "IMMICH_STREAM_LOCK_WAIT": "30s",
            "IMMICH_STREAM_PART_SIZE": "5MiB",
        }
    )
    bucket = bucket_of(env)
    bucket.s3.create_bucket(Bucket=bucket_name)  # through the API: rclone's directory cache hides mkdirs
    make_library(stack.library, seed=SEED, photos=8)
    subprocess.run(
        [
            "docker",
            "exec",
            "immich_postgres",
            "pg_dump",
            "-U",
            "postgres",
            "--clean",
            "--if-exists",
            "-f",
            PRISTINE,
            "immich",
        ],
        check=True,
        capture_output=True,
    )
    # Immich's restore documentation's correction: earthdistance's functions need public on
    # the search_path, which pg_dump empties.
    subprocess.run(
        [
            "docker",
            "exec",
            "immich_postgres",
            "sed",
            "-i",
            "s/SELECT pg_catalog.set_config('search_path', '', false);/"
            "SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);/",
            PRISTINE,
        ],
        check=True,
        capture_output=True,
    )
    rows_before = db_rows(stack)
    state_file = Path(env["IMMICH_STREAM_STATE_DIR"]) / "stack-immich.json"  # README: exists while the stack is down
    watch = StackWatch()
    violations: list[str] = []
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    say(
        f"chaos: seed {SEED}, {ITERATIONS} iterations, stall timeout {STALL:.0f} s; reproduce with "
        f"IMMICH_STREAM_CHAOS_SEED={SEED} IMMICH_STREAM_CHAOS_ITERATIONS={ITERATIONS}"
    )
    verified: set[str] = set()
    committed_ever: set[str] = set()

    def verify_new(where: str) -> list[str]:
        """verify --read-data every committed snapshot not verified yet."""
        problems = []
        for sid in committed_snapshots(bucket):
            committed_ever.add(sid)
            if sid in verified:
                continue
            r = run_cli("verify", sid, "--read-data", env=env, timeout=180)
            if r.code != 0:
                problems.append(
                    f"verify {sid} --read-data exit {r.code} {where}: "
                    + " | ".join([*[ln for ln in r.out.splitlines() if ln.startswith("problem")][:3], r.last_error])
                )
            verified.add(sid)
        return problems

    # Fault-free rounds first: the usual duration of each command (faults land at a random
    # fraction of it), three snapshots for prune and restore, proof the product works here.
    usual: dict[str, float] = {}
    restore_root = tmp_path / "restore"
    churn(stack.library, random.Random(f"{SEED}/churn/0"), 0)
    for op in ("backup-all", "backup-app", "backup-none", "restore-files", "restore-db", "prune"):
        shutil.rmtree(restore_root, ignore_errors=True)
        o = execute(command(op, restore_root), env, None, 0, chaos_s3)
        usual[op] = o.ended - o.started
        assert o.code == 0, f"fault-free {op} failed (exit {o.code}): {o.error_lines or o.err[-2000:]}"
    assert running_now() >= set(CONTAINERS)
    assert not verify_new("after the fault-free rounds")
    say("chaos: usual durations " + ", ".join(f"{k} {v:.1f} s" for k, v in usual.items()))

    fired: Counter[str] = Counter()
    drawn: Counter[str] = Counter()
    ops_done: Counter[str] = Counter()
    exits: dict[str, Counter[str]] = {f: Counter() for f in FAULTS}
    longest_down = (0.0, "")
    longest_exit = (0.0, "")
    data_lost = 0
    t_suite = time.monotonic()

    for i, plan in enumerate(plans, 1):
        tag = f"iteration {i} ({plan.op}, {plan.fault}; seed {SEED})"
        found: list[str] = []
        drawn[plan.fault] += 1
        ops_done[plan.op] += 1
        if plan.op.startswith("backup"):
            churn(stack.library, random.Random(f"{SEED}/churn/{i}"), i)
        shutil.rmtree(restore_root, ignore_errors=True)
        run_env = dict(env)
        proxy: FaultProxy | None = None
        dproxy: DockerProxy | None = None
        if plan.fault == "s3-flaky":
            proxy = FaultProxy(chaos_s3.endpoint)
            proxy.add_flaky(any_request, rate=0.10, seed=plan.flaky_seed)
            run_env["S3_ENDPOINT_URL"] = proxy.endpoint
        elif plan.fault == "docker-stop":
            dproxy = DockerProxy(str(tmp_path / f"docker-{i}.sock"))
            dproxy.fail_stop(plan.container)
            run_env["DOCKER_HOST"] = dproxy.docker_host
        t_begin = time.monotonic()
        try:
            o = execute(command(plan.op, restore_root), run_env, plan, usual[plan.op], chaos_s3)
        finally:
            if proxy is not None:
                proxy.stop()
            if dproxy is not None:
                dproxy.stop()
        if proxy is not None:
            o.injected = dict(proxy.rules[0].flaky.counts)  # type: ignore[union-attr]
        if dproxy is not None and dproxy.injected:
            o.injected = {"stop 500": len(dproxy.injected)}
        did_fire = o.fault_at is not None and (plan.fault not in ("s3-flaky", "docker-stop") or bool(o.injected))
        if did_fire:
            fired[plan.fault] += 1
        code = o.code if o.code is not None else -999
        exits[plan.fault][str(code)] += 1
        detail = ""
        if plan.fault in ("sigkill", "s3-frozen", *SIGNAL_PAIRS):
            detail = (f"at {o.fault_at - o.started:.1f} s" if o.fault_at else "after the run ended") + (
                f", again +{o.second_at - o.fault_at:.2f} s" if o.second_at and o.fault_at else ""
            )
        elif plan.fault == "docker-stop":
            detail = f"{plan.container}: {len(dproxy.injected) if dproxy else 0} stops failed"
        else:
            detail = "injected " + (", ".join(f"{v} {k}" for k, v in sorted(o.injected.items())) or "nothing")

        # -- the bound: stack up within STALL+30 s of the fault, exit within 60 s after that
        recovered = ""
        if o.killed_by_test:
            logged = [ln for ln in o.err.splitlines() if ln.startswith("[")]
            found.append(
                f"still running {o.ended - (o.fault_at or o.started):.0f} s after the fault (bound "
                f"{STALL + 30 + EXIT_AFTER_RESTART:.0f} s): killed by the test; its last log lines: "
                f"{logged[-2:]}; task stacks in {tmp_path}/iteration-{i}.err"
            )
        if plan.fault == "sigkill" and o.fault_at is not None:
            time.sleep(SETTLE)  # a stop the killed run asked for goes on in dockerd: let it land
            if state_file.exists() or not running_now() >= set(CONTAINERS):
                # The next backup must start the stack before anything else.
                r = execute(["backup", "--stop", "none"], env, None, 0, chaos_s3)
                recovered = f"; recovery backup exit {r.code} after {r.ended - r.started:.1f} s"
                if r.code != 0:
                    found.append(f"the recovery backup after SIGKILL exited {r.code}: {r.error_lines[-1:]}")
                if "was killed with the stack stopped" not in r.err:
                    found.append("the recovery backup did not say it started the stack left stopped")
        elif o.fault_at is not None and not o.killed_by_test and o.ended - o.fault_at > longest_exit[0]:
            longest_exit = (o.ended - o.fault_at, tag)

        # -- the stack runs, 3 s after the exit at the latest (after a second signal the run
        # may exit as soon as the restart is issued), and ran again within the bound
        time.sleep(max(0.0, o.ended + SETTLE - time.monotonic()))
        now = time.monotonic()
        down_now = set(CONTAINERS) - running_now()
        if down_now:
            ran_again = any(set(CONTAINERS) <= r for _, r in watch.window(o.ended, now))
            found.append(
                f"{', '.join(sorted(down_now))} not running {SETTLE:.0f} s after the run exited"
                + (
                    " (all ran after the exit, then these stopped: a stop that landed after the restart)"
                    if ran_again
                    else ""
                )
            )
            start_missing(stack)
        elif plan.fault != "sigkill" and o.fault_at is not None:
            up = watch.up_again(o.fault_at, now) or now
            if up - o.fault_at > RESTART_BOUND:
                found.append(
                    f"the stack ran again only {up - o.fault_at:.1f} s after the fault (bound {RESTART_BOUND:.0f} s)"
                )
            if o.ended - up > EXIT_AFTER_RESTART and not o.killed_by_test:  # else already said
                found.append(
                    f"the process exited {o.ended - up:.1f} s after the stack ran again (bound "
                    f"{EXIT_AFTER_RESTART:.0f} s)"
                )

        # -- exit codes: documented, and the one the fault calls for
        if not o.killed_by_test:
            expect: set[int] | None = None
            if o.fault_at is None or (plan.fault in ("s3-flaky", "docker-stop") and not did_fire):
                expect = {0}
            elif plan.fault == "sigkill":
                expect = {-signal.SIGKILL}
            elif plan.fault == "sigterm2":
                expect = {143, -signal.SIGTERM, 0}  # -15: before the handlers; 0: the work was done
            elif plan.fault in SIGNAL_PAIRS:
                sig = SIGNAL_PAIRS[plan.fault]
                expect = {c for c in codes if c >= 128} | {-sig, 0}
            elif plan.fault == "s3-frozen":
                expect = {1, 0}  # 0: nothing needed S3 after the freeze
                if code == 1 and not any("s3" in ln.lower() for ln in o.error_lines[-1:]):
                    found.append(f"exit 1 without one line naming S3 as what hung: {o.error_lines[-1:]}")
            elif plan.fault == "s3-flaky":
                expect = {0}  # README: transient errors (5xx, resets, timeouts) are retried
            elif plan.fault == "docker-stop":
                expect = {1}
                if code == 1 and not any(plan.container in ln for ln in o.error_lines[-1:]):
                    found.append(f"exit 1 without one line naming {plan.container}: {o.error_lines[-1:]}")
            if code >= 0 and code not in codes:
                found.append(f"exit code {code} is not documented in the README")
            if expect is not None and code not in expect:
                found.append(f"exit {code}, expected {sorted(expect)}: {o.error_lines[-1:] or o.err[-300:]!r}")
            if code >= 0 and len(o.error_lines) > 1:
                found.append(f"{len(o.error_lines)} error lines, not one: {o.error_lines}")

        # -- the database lost nothing
        if plan.op == "restore-db":
            wait_no_restore_running(stack)
        rows = db_rows(stack)
        if rows != rows_before:
            found.append(f"the database holds {rows}, not {rows_before}")
            data_lost += 1
            try:
                repair_database()
                assert db_rows(stack) == rows_before, "the database differs after the repair"
            except AssertionError as exc:
                pytest.fail(
                    "\n".join(
                        [
                            *violations,
                            *(f"{tag}: {f}" for f in found),
                            f"the test could not repair the database, stopping: {exc}",
                        ]
                    ),
                    pytrace=False,
                )

        # -- every committed snapshot whole, the new ones read back completely
        missing = missing_references(bucket)
        if missing:
            data_lost += len(missing)
            found.append(f"{len(missing)} objects missing: {missing[:3]}")
        bad = verify_new(f"after {tag}")
        data_lost += len(bad)
        found.extend(bad)

        down = watch.longest_down(t_begin, time.monotonic())
        if down > longest_down[0]:
            longest_down = (down, tag)
        for f in found:
            violations.append(f"{tag}: {f}")
        if found:
            (tmp_path / f"iteration-{i}.err").write_text(o.err)
        say(
            f"chaos {i:2}/{ITERATIONS} {plan.op:<13} {plan.fault:<11} {detail}; exit {code} after "
            f"{o.ended - o.started:.1f} s{recovered}; immich_server down {down:.1f} s; "
            f"{len(committed_snapshots(bucket))} snapshots; " + ("ok" if not found else "FAILED: " + "; ".join(found))
        )

    # -- the end: every committed snapshot read back in full once more
    r = run_cli("verify", "--all", "--read-data", env=env, timeout=600)
    if r.code != 0:
        violations.append(f"final verify --all --read-data (seed {SEED}) exit {r.code}: {r.last_error}")
        data_lost += 1
    watch.stop()
    say(
        f"chaos totals (seed {SEED}): {ITERATIONS} iterations in {time.monotonic() - t_suite:.0f} s; commands "
        + ", ".join(f"{k} {v}" for k, v in sorted(ops_done.items()))
    )
    say("chaos faults (drawn/fired): " + ", ".join(f"{f} {drawn[f]}/{fired[f]}" for f in FAULTS))
    say(
        "chaos exit codes by fault: "
        + "; ".join(f"{f} " + ", ".join(f"{c}x{n}" for c, n in sorted(exits[f].items())) for f in FAULTS if exits[f])
    )
    say(
        f"chaos snapshots: {len(committed_ever)} committed during the run, {len(verified)} verified with "
        f"--read-data, {len(committed_snapshots(bucket))} kept at the end; data lost: {data_lost}"
    )
    say(
        f"chaos longest downtime of immich_server: {longest_down[0]:.1f} s ({longest_down[1] or '-'}); longest "
        f"exit after a fault: {longest_exit[0]:.1f} s ({longest_exit[1] or '-'}); "
        f"{len(violations)} invariant failures"
    )
    if violations:
        pytest.fail(
            f"{len(violations)} chaos invariants failed (seed {SEED}):\n"
            + "\n".join(violations)
            + "\n\n"
            + "\n".join(report),
            pytrace=False,
        )


# -- the Docker proxy itself ----------------------------------------------------------------


def test_docker_proxy_passes_a_backup_through(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    """Everything the CLI asks of Docker, exec streams (pg_isready, pg_dump) included,
    goes through the proxy unchanged: a backup through it succeeds."""
    make_library(stack.library, photos=3, odd_names=False)
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    try:
        env["DOCKER_HOST"] = proxy.docker_host
        r = run_cli("backup", "--stop", "all", env=env)
    finally:
        proxy.stop()
    assert r.code == 0, r.err
    assert running_containers() == set(CONTAINERS)
    assert len(bucket_of(env).snapshots()) == 1
    assert proxy.upgrades >= 2, "pg_isready and pg_dump run through exec streams"
    assert any(p.endswith("/stop") for _, p in proxy.requests) and not proxy.injected


def test_docker_proxy_fails_the_stop_of_one_container(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    try:
        proxy.fail_stop("immich_server")
        env["DOCKER_HOST"] = proxy.docker_host
        r = run_cli("backup", "--stop", "app", env=env)
    finally:
        proxy.stop()
    assert r.code == 1, r.err
    assert "immich_server" in r.last_error and "injected" in r.last_error
    assert proxy.injected
    time.sleep(3)  # the other stops, if still in flight in dockerd, land by now
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


@pytest.mark.slow
def test_a_prune_that_repacks_while_a_restore_runs_waits_for_it(s3_env: dict[str, str], tmp_path: Path) -> None:
    """The chaos case of issue 29: a restore (paced to take seconds) holds its shared lock;
    a prune that would repack the packs it reads refuses at once with --lock-wait 0, and
    with a wait, repacks only after the restore ended. The restore gets every byte, and
    every kept snapshot restores and verifies after the repack."""
    from tests.test_hardening_restore import restored
    from tests.test_repack import restores_intact, scenario

    bucket, _, kept, old_pack = scenario(s3_env, big=3 * MIB)
    _, s3 = kept
    restore = start_cli(
        "restore", s3, "--root", "library", "--to", str(tmp_path / "during"),
        # 6 s for its 3 MiB: at 1 MiB/s (3 s) it could end before the second prune started on
        # a loaded machine (two xdist workers): that prune then had no lock to wait for
        env=dict(s3_env, IMMICH_STREAM_LIMIT_DOWNLOAD="0.5"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not bucket.keys("locks/") and restore.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bucket.keys("locks/") and restore.poll() is None, "the restore took no lock, or ended at once"
        r = run_cli("prune", "--keep-last", "2", "--lock-wait", "0", env=s3_env)
        assert r.code == 1 and "locked by" in r.last_error and restore.poll() is None, r.err
        assert len(bucket.snapshots()) == 3  # the refused prune removed nothing
        r = run_cli("prune", "--keep-last", "2", "--lock-wait", "2m", env=s3_env)
        _, err = restore.communicate(timeout=60)
        ended = restore.returncode
    finally:
        if restore.poll() is None:
            restore.kill()
    assert ended == 0, err
    assert r.code == 0 and "waiting up to" in r.err, r.err  # for the restore's lock, before it did anything
    assert re.search(r"^repack +2 packs repacked into 1 ", r.out, re.M), r.out
    assert old_pack not in bucket.keys("data/")
    assert restored(tmp_path / "during") == {os.fsencode(p): e.body for p, e in kept[s3].items()}
    restores_intact(s3_env, kept, tmp_path / "after")
