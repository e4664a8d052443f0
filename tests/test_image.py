"""The Docker image (Dockerfile): built from a local Python base, it backs the test stack
up from inside a container, as contrib/compose.backup.yml runs it.

No registry can be reached here, so neither python:3.11-slim nor PyPI is used:
- the base is the Debian postgres test image plus this machine's own Debian Python 3.11
  (the files of its packages, same Debian release: the same glibc and libraries);
- the wheels are this test run's installed dependencies packed back into wheels, and
  immich-stream's own wheel built from the source by Debian's pip and setuptools, offline.
The Dockerfile then runs unchanged but for its build arguments. Marker `image`:
`-m 'not image'` skips it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import CONTAINERS, KEY, SECRET, ImmichStack, running_containers
from tests.helpers import REPO_ROOT, Bucket, make_library

pytestmark = pytest.mark.image

PG_BASE = "immich-stream-test/debian-postgres:15"  # tests/setup_machine.sh builds it
PY_BASE = "immich-stream-test/python:3.11"
IMAGE = "immich-stream-test/app:latest"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-pip, -setuptools and -wheel


def run(*args: str, **kw: object) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}"
    return str(proc.stdout)


def _debian_closure(roots: list[str], present: set[str]) -> list[str]:
    """The host's installed Debian packages that `roots` need, less those `present`."""

    def installed(pkg: str) -> bool:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        return out.returncode == 0 and "ok installed" in out.stdout

    todo, seen = list(roots), set()
    while todo:
        pkg = todo.pop()
        if pkg in seen or pkg in present:
            continue
        seen.add(pkg)
        deps = run("dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", pkg)
        for group in filter(None, (g.strip() for g in deps.split(","))):
            alts = [a.strip().split(" ")[0].split(":")[0] for a in group.split("|")]
            if not any(a in present for a in alts):
                todo.extend(next(([a] for a in alts if installed(a)), []))
    return sorted(seen)


def python_base(work: Path) -> None:
    """PY_BASE: the postgres test image's Debian plus the host's Python 3.11 (python3-venv and
    what it depends on, file by file from dpkg's lists). About two seconds; cached by tag."""
    if subprocess.run(["docker", "image", "inspect", PY_BASE], capture_output=True).returncode == 0:
        return
    present = set(run("docker", "run", "--rm", PG_BASE, "dpkg-query", "-W", "-f=${Package}\\n").split())
    files: set[str] = set()
    for pkg in _debian_closure(["python3.11-venv", "python3-venv", "python3"], present):
        for path in run("dpkg", "-L", pkg).splitlines():
            p = Path(path)
            if p.is_symlink() or p.is_file():
                files.add(path)
    ctx = work / "python-base"
    ctx.mkdir()
    (ctx / "files").write_text("\n".join(sorted(files)) + "\n")
    run("tar", "-C", "/", "-cf", str(ctx / "python.tar"), "-T", str(ctx / "files"))
    (ctx / "Dockerfile").write_text(f"FROM {PG_BASE}\nADD python.tar /\n")
    run("docker", "build", "-q", "-t", PY_BASE, str(ctx), env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin"})


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(dist: md.Distribution, out: Path) -> None:
    """An installed distribution back into the wheel it was installed from."""
    tags = [ln.split(":", 1)[1].strip() for ln in (dist.read_text("WHEEL") or "").splitlines() if ln.startswith("Tag:")]
    assert tags, f"{dist.metadata['Name']} has no wheel tags"
    py, abi, plat = (".".join(sorted({t.split("-")[i] for t in tags})) for i in range(3))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    site = Path(str(dist.locate_file("")))
    records: list[str] = []
    info_dir = ""
    with zipfile.ZipFile(
        out / f"{name}-{dist.version}-{py}-{abi}-{plat}.whl", "w", zipfile.ZIP_DEFLATED, True, 1
    ) as zf:
        for f in dist.files or []:
            rel = f.as_posix()
            if rel.startswith("..") or "__pycache__" in rel:  # scripts pip writes again; caches
                continue
            if f.parent.name.endswith(".dist-info"):
                info_dir = f.parent.as_posix()
                if f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
            data = (site / f).read_bytes()
            zf.writestr(rel, data)
            records.append(f"{rel},{_record_hash(data)},{len(data)}")
        zf.writestr(f"{info_dir}/RECORD", "\n".join([*records, f"{info_dir}/RECORD,,"]) + "\n")


def wheels(into: Path, src: Path) -> None:
    """immich-stream's wheel from src, and its runtime dependencies from this virtualenv."""
    into.mkdir()
    run(
        SYSTEM_PYTHON,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(into),
        str(src),
    )
    dependency_wheels(into, frozenset({"notify"}))  # the image installs immich-stream[notify]


def dependency_wheels(into: Path, extras: frozenset[str] = frozenset()) -> None:
    """immich-stream's runtime dependencies (those of `extras` too), packed from this virtualenv."""
    todo: list[tuple[str, frozenset[str]]] = [("immich-stream", extras)]
    seen: set[tuple[str, frozenset[str]]] = set()
    packed = {"immich-stream"}
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = md.distribution(name)
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key not in packed:
            packed.add(key)
            repack(dist, into)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((re.sub(r"[-_.]+", "-", req.name).lower(), frozenset(req.extras)))


@pytest.fixture(scope="session")
def image(machine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Dockerfile built on PY_BASE, offline (once per session: about half a minute)."""
    work = tmp_path_factory.mktemp("image")
    python_base(work)
    ctx = work / "context"
    ctx.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, ctx / name)
    shutil.copytree(REPO_ROOT / "immich_stream", ctx / "immich_stream", ignore=shutil.ignore_patterns("__pycache__"))
    src = work / "src"  # pip wheel writes build/ and egg-info into the tree it builds
    shutil.copytree(ctx, src)
    wheels(ctx / "wheels", src)
    run(
        "docker",
        "build",
        "-q",
        "-t",
        IMAGE,
        "--build-arg",
        f"BASE={PY_BASE}",
        "--build-arg",
        "PIP_ARGS=--no-index --find-links /src/wheels",
        "--build-arg",
        "PACKAGE=immich-stream[notify]",
        str(ctx),
        env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    return IMAGE


def test_backup_from_the_image(
    image: str, env: dict[str, str], stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    """As contrib/compose.backup.yml runs it: the Docker socket, Immich's directory (as
    IMMICH_DIR), the library and the Postgres directory mounted read-only, settings in the
    environment; then, as the README says to restore with the image, the recorded
    docker-compose.yml and .env back into a writable mount."""
    written = make_library(stack.library, photos=10, odd_names=False)
    name = "immich_stream_image_test"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    settings = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": env["S3_ENDPOINT_URL"],  # 127.0.0.1: the host's network
        "S3_BUCKET": env["S3_BUCKET"],
        "S3_PATH_STYLE": "true",
        "COMPOSE_PROJECT_NAME": "immich",
        "DB_CONTAINER": "immich_postgres",
        "IMMICH_DIR": "/immich",
        "LIBRARY_DIR": "/data/library",
        "POSTGRES_DIR": "/data/postgres",
    }

    def sidecar(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--name",
                name,
                "--network",
                "host",
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "-v",
                f"{stack.dir}:/immich:ro",
                "-v",
                f"{stack.library}:/data/library:ro",
                "-v",
                f"{stack.postgres}:/data/postgres:ro",
                "-v",  # the recovery file must outlive a --rm container (as compose.backup.yml's volume)
                "immich-stream-test-image-state:/state",
                *[a for k, v in settings.items() for a in ("-e", f"{k}={v}")],
                image,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )

    # README: the sidecar's repository is created once with `init` (no terminal: it asks nothing)
    proc = sidecar("init", "--plaintext")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the image has the notify extra: --notify is accepted (Apprise is there)
    proc = sidecar("config", "--notify", "json://127.0.0.1:9/never-sent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = sidecar("backup", "--exclude", "thumbs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sid,) = bucket.snapshots()
    summary = bucket.snapshot(sid)
    assert summary["mode"] == "all" and summary["roots"] == {"postgres": "/data/postgres", "library": "/data/library"}
    assert summary["excluded"] == ["thumbs"]
    lines = {ln["path"]: ln for ln in bucket.manifest(sid) if ln["root"] == "library" and ln["type"] == "file"}
    expect = {rel.decode(): digest.decode() for rel, digest in written.items() if not rel.startswith(b"thumbs/")}
    expect["thumbs/.immich"] = hashlib.sha256(b"").hexdigest()
    assert {p: ln["sha256"] for p, ln in lines.items()} == expect
    assert any(ln["root"] == "postgres" and ln["path"] == "PG_VERSION" for ln in bucket.manifest(sid))
    assert bucket.get(summary["database"]["key"])[:2] == b"\x1f\x8b"  # the dump, gzipped
    assert running_containers() == set(CONTAINERS)  # the stack was started again
    subprocess.run(["docker", "volume", "rm", "-f", "immich-stream-test-image-state"], capture_output=True)
    assert set(summary["config_files"]) == {"docker-compose.yml", ".env"}

    # restore --config-files from the image (README: restoring with the container image)
    target = tmp_path / "restored"
    target.mkdir()
    proc = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "-v",
            f"{target}:/restore",
            *[
                a
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "S3_BUCKET", "S3_PATH_STYLE")
                for a in ("-e", f"{k}={settings[k]}")
            ],
            image,
            "restore",
            "latest",
            "--config-files",
            "--to",
            "/restore",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "immich_postgres" in (target / "docker-compose.yml").read_text()
    restored_env = (target / ".env").read_text()
    assert "UPLOAD_LOCATION=" in restored_env
    assert "test-db-password" not in restored_env and "DB_PASSWORD=immich-stream-removed-secret" in restored_env
