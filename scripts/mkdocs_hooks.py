"""MkDocs hooks (mkdocs.yml: hooks) for the documentation site built from docs/.

- The site's home page is the README, its links into docs/ made relative to the site, and
  the docs' links to ../README.md pointed at that home page: the README stays the one copy.
- A line `<!-- help: COMMAND -->` in a page becomes the command's real `--help` output,
  from the parser the CLI runs (so a page cannot drift from the flags).
- Every command has its page docs/commands/COMMAND.md and every such page is a command:
  otherwise the build fails naming what to add or remove.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

from immich_stream.commands import build_parser

HELP_LINE = re.compile(r"^<!-- help: ([a-z-]+) -->$", re.M)
WIDTH = "100"


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by name, in the order `immich-stream --help` lists them."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise PluginError("immich-stream's parser has no commands")


def help_of(name: str, parsers: dict[str, argparse.ArgumentParser]) -> str:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps at the terminal's width: the same every build
    try:
        parser = build_parser() if name == "immich-stream" else parsers[name]
        return parser.format_help()
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def readme_markdown(root: Path) -> str:
    text = (root / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Files, config: Any) -> Files:
    docs = Path(config["docs_dir"])
    commands = set(command_parsers())
    pages = {p.stem for p in (docs / "commands").glob("*.md")} - {"index"}
    if missing := sorted(commands - pages):
        raise PluginError(
            "no page for the command(s) " + ", ".join(missing) + ": add docs/commands/NAME.md (see backup.md) "
            "and its line in mkdocs.yml's nav"
        )
    if stale := sorted(pages - commands):
        raise PluginError("docs/commands/ has a page for no command: " + ", ".join(f"{s}.md" for s in stale))
    files.append(File.generated(config, "index.md", content=readme_markdown(docs.parent)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    parsers = command_parsers()

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name != "immich-stream" and name not in parsers:
            raise PluginError(f"{page.file.src_uri}: <!-- help: {name} -->: no such command")
        return "```text\n" + help_of(name, parsers).rstrip() + "\n```"

    markdown = HELP_LINE.sub(block, markdown)
    return re.sub(r"\]\((?:\.\./)+README\.md", "](" + "../" * page.file.src_uri.count("/") + "index.md", markdown)
