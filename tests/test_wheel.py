"""The package as users get it (issue 27): `python -m build` makes an sdist and, from it, a
wheel; the wheel installed into a clean virtualenv runs `immich-stream --help` and `doctor`
against a real S3 server (rclone) with no Docker engine to reach.

The wheel must hold every module and data file of immich_stream/: a subpackage left out of
the package list, or a data file left out of the sdist, installs fine and fails only when a
user runs the command that imports it. Dependencies come from this virtualenv's installed
distributions, packed back into wheels (tests/test_image.py's repack): no index needed.
About 25 s, hence `slow` (not in scripts/check).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import KEY, SECRET, S3Server, base_env
from tests.helpers import REPO_ROOT, make_library
from tests.test_image import dependency_wheels

pytestmark = pytest.mark.slow

SOURCE = ("pyproject.toml", "README.md", "immich_stream")  # what a clone has that the build reads


@dataclass
class Installed:
    wheel: Path
    python: Path  # the clean virtualenv's interpreter
    bin: Path


def source_files() -> set[str]:
    """Every file of the package in the source tree, as its path in a wheel."""
    root = REPO_ROOT / "immich_stream"
    return {
        p.relative_to(REPO_ROOT).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCE:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    dist = work / "dist"
    # the build (an isolated environment with the backend pyproject.toml asks for) runs while
    # the dependencies are packed
    build = subprocess.Popen(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deps = work / "deps"
    try:
        deps.mkdir()
        dependency_wheels(deps)
        out, _ = build.communicate(timeout=240)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, out
    (wheel,) = dist.glob("immich_stream-*.whl")
    assert list(dist.glob("immich_stream-*.tar.gz")), "python -m build makes the sdist too"

    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # clean: no site-packages of this one
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, "install", "-q", "--no-compile", "--no-index", "--find-links", str(deps), str(wheel)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield Installed(wheel, python, env_dir / "bin")


def test_the_wheel_holds_every_module_and_data_file(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    in_wheel = {n for n in names if n.startswith("immich_stream/")}
    missing = sorted(source_files() - in_wheel)
    assert not missing, (
        f"the wheel lacks {len(missing)} file(s) of the package, e.g. {missing[:5]}: "
        "a subpackage or data file that pyproject.toml (or the sdist) leaves out"
    )
    assert "immich-stream = immich_stream.cli:main" in entry_points
    wanted = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    required = {
        Requirement(ln.split(":", 1)[1]).name for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")
    }
    assert {Requirement(d).name for d in wanted} <= required


def test_the_installed_wheel_runs_help_and_doctor(installed: Installed, rclone_s3: S3Server, tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env.pop("PYTHONPATH", None)
    # what runs is the wheel's copy, not this source tree
    where = subprocess.run(
        [str(installed.python), "-c", "import immich_stream; print(immich_stream.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.startswith(str(installed.python.parent.parent)), where.stdout + where.stderr

    helped = subprocess.run(
        [str(installed.bin / "immich-stream"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: immich-stream")
    for command in ("backup", "restore", "doctor", "prune", "verify", "drill", "snapshots"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.M), f"--help lists {command}"

    library, postgres = tmp_path / "library", tmp_path / "postgres"
    make_library(library, photos=2, odd_names=False)
    postgres.mkdir()
    (postgres / "PG_VERSION").write_text("15\n")
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "S3_ENDPOINT_URL": rclone_s3.endpoint,
            "S3_BUCKET": rclone_s3.new_bucket(),
            "S3_PATH_STYLE": "true",
            "LIBRARY_DIR": str(library),
            "POSTGRES_DIR": str(postgres),
            "IMMICH_STREAM_STOP": "none",
            "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",  # no Docker engine to reach
        }
    )
    doctor = subprocess.run(
        [str(installed.bin / "immich-stream"), "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    lines = doctor.stdout.splitlines()
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "Traceback" not in doctor.stdout + doctor.stderr
    # every S3 probe passed with the wheel's code; the one failure is Docker's, in one line
    assert any(re.match(r"ok\s+S3 reachable, credentials, bucket", ln) for ln in lines), doctor.stdout
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert len(failed) == 1 and re.match(
        rf"FAIL\s+Docker and containers\s+cannot reach Docker at unix://{tmp_path}/no-docker.sock", failed[0]
    ), doctor.stdout
    last = doctor.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"immich-stream: error: doctor: 1 of \d+ checks failed \(listed above\)", last), doctor.stderr
