"""The documentation site's command pages (docs/commands/, mkdocs.yml): every command has
one, listed in the nav, and every command's --help renders (the pages embed it through
scripts/mkdocs_hooks.py; `mkdocs build --strict` in scripts/check checks the links)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest

from immich_stream.cli import main
from immich_stream.commands import build_parser
from tests.helpers import REPO_ROOT


def commands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("the parser has no commands")


def test_every_command_has_a_page_in_the_nav() -> None:
    pages = {p.stem for p in (REPO_ROOT / "docs" / "commands").glob("*.md")} - {"index"}
    assert pages == set(commands()), "docs/commands/NAME.md: one page per command, no other"
    nav = set(re.findall(r"^\s+- ([a-z]+): commands/\1\.md$", (REPO_ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav == set(commands()), "mkdocs.yml's nav lists every command page"
    for name in commands():
        text = (REPO_ROOT / "docs" / "commands" / f"{name}.md").read_text()
        assert f"<!-- help: {name} -->" in text.splitlines(), f"docs/commands/{name}.md embeds its --help"


@pytest.mark.parametrize("name", commands())
def test_every_command_help_renders(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`immich-stream prune --help` once died in argparse on the "5%" of a setting's help."""
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert out.getvalue().startswith(f"usage: immich-stream {name} ")
