"""scripts/layers.py, the house rules' check: it passes a package that keeps them and names
each breach of one that does not (a check that cannot fail would guard nothing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "layers.py"


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layers_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def package(tmp_path: Path) -> Path:
    root = tmp_path / "immich_stream"
    for folder in ("s3", "host", "repository", "backup", "restore", "checks", "config", "commands"):
        write(root, f"{folder}/__init__.py", '"""A layer."""\n')
    write(root, "__init__.py", "")
    write(root, "errors.py", "class E(Exception):\n    pass\n")
    write(root, "progress.py", "import sys\n\nprint('bar', file=sys.stderr)\n")
    write(root, "cli.py", "from immich_stream.backup import run\n\nprint(run)\n")
    write(root, "s3/store.py", "import aiohttp\nimport botocore\n\nfrom immich_stream.errors import E\n")
    write(root, "host/stack.py", "import aiodocker\nimport aiohttp\n")
    write(root, "repository/repo.py", "from immich_stream.s3 import store\n\nKEY = 'snapshots/'\n")
    write(root, "backup/run.py", "from immich_stream.repository import repo\nfrom . import walk\n")
    write(root, "backup/walk.py", '"""Walk: keys like snapshots/ are named in prose only."""\n')
    return root


def test_a_package_that_keeps_the_rules_passes(tmp_path: Path) -> None:
    assert load_checker().check(package(tmp_path)) == []


def test_each_breach_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    root = package(tmp_path)
    write(root, "s3/store.py", "from immich_stream.repository import repo\n")  # an arrow up
    write(root, "backup/walk.py", "import aiodocker\n\nprint('x')\nkey = f'data/{1}/'\n")
    write(root, "checks/doctor.py", "import sys\n\ndef probe(prefix: str) -> str:\n    return f'{prefix}/doctor/x'\n")
    write(root, "host/big.py", "x = 1\n" * 800)
    breaches = load_checker().check(root)
    assert any("s3/store.py:1: s3 imports immich_stream.repository" in b for b in breaches), breaches
    assert any("backup/walk.py:1: imports aiodocker, which only host/ may" in b for b in breaches), breaches
    assert any("backup/walk.py:3: print()" in b for b in breaches), breaches
    assert any("backup/walk.py:4: builds an S3 key" in b for b in breaches), breaches
    assert any("checks/doctor.py:4: builds an S3 key" in b for b in breaches), breaches
    assert any("host/big.py: 800 lines" in b for b in breaches), breaches
    assert len(breaches) == 6, breaches
