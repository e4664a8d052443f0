"""Compose files that are hostile or odd (review of issue 25): each is one line (ConfigError)
or resolved as docker compose would, never a traceback or a hang. No Docker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError


def load(tmp_path: Path, **environ: str) -> cfg.Settings:
    return cfg.load(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **environ})


BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (BOMB, "too large or too deeply nested"),  # 9**9 strings once expanded
        ("services: &s\n  x: [*s]\n", "too large or too deeply nested"),  # an alias of itself
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("# padding\n" * 120_000, "over 1024 KiB"),
    ],
    ids=["billion-laughs", "self-alias", "deep", "huge"],
)
def test_hostile_compose_file_is_one_line_and_quick(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yaml").write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=says) as exc:
        load(tmp_path, IMMICH_DIR=str(tmp_path / "app"))
    assert time.monotonic() - t0 < 5 and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text",
    [
        "services:\n  immich-server:\n    volumes: 5\n  database:\n    volumes: 7\n",
        "services:\n  foo:\n  bar: 3\n",
        "services:\n  immich-server:\n    volumes: [{type: bind, source: [1], target: /data}]\nvolumes: 3\n",
    ],
    ids=["volumes-not-a-list", "service-not-a-mapping", "source-not-a-string"],
)
def test_compose_file_of_the_wrong_shapes_gives_no_paths_and_no_traceback(tmp_path: Path, text: str) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yaml").write_text(text)
    s = load(tmp_path, IMMICH_DIR=str(tmp_path / "app"))
    assert (s.library_dir, s.postgres_dir, s.postgres_volume) == (None, None, None)
