"""The house rules of immich_stream/, checked from the source (no import of the package):

1. Arrows point down. Each module belongs to a layer (its folder, or the shared modules at
   the top level); it may import only the layers listed for it in ALLOWED.
2. Third-party clients stay in their room: botocore, aiobotocore, aioboto3 only in s3/;
   aiodocker only in host/; aiohttp only in s3/ and host/ (aiodocker's errors are aiohttp's).
3. Only repository/ builds S3 keys: no string literal elsewhere that starts with one of the
   repository's top-level key prefixes, and no f-string that joins something ending in
   `prefix` with a "/".
4. Nothing below the command layer prints: print() and sys.stdout / sys.stderr only in the
   command layer (cli.py, commands/) and progress.py (the Reporter, and the log handler).
5. No module passes MAX_LINES lines.

python scripts/layers.py  (exit 1 and one line per breach; run by scripts/check)
"""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

PACKAGE = "immich_stream"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 720

SHARED = "shared"  # errors, cleanup, problems, progress, __init__
COMMANDS = "commands"  # cli.py, commands/, __main__.py
OPS = ("backup", "restore", "checks", "browse")
ALLOWED: dict[str, set[str]] = {
    SHARED: {SHARED, "config"},  # progress formats sizes with config's helpers
    "config": {SHARED, "config"},
    "s3": {SHARED, "config", "s3"},
    "host": {SHARED, "config", "host"},
    "repository": {SHARED, "config", "s3", "host", "repository"},
    **{op: {SHARED, "config", "s3", "host", "repository", *OPS} for op in OPS},
    COMMANDS: {SHARED, "config", "s3", "host", "repository", *OPS, COMMANDS},
}
THIRD_PARTY = {
    "botocore": {"s3"},
    "aiobotocore": {"s3"},
    "aioboto3": {"s3"},
    "boto3": {"s3"},
    "aiodocker": {"host"},
    "aiohttp": {"s3", "host"},
}
KEY_PREFIXES = ("config.json", "data/", "snapshots/", "locks/", "preflight/", "journals/", "doctor/")
PRINTERS = {COMMANDS}
PRINTER_MODULES = {"progress"}


def layer_of(module: str, root: Path = ROOT) -> str:
    """immich_stream.s3.store -> s3; immich_stream.cli -> commands; immich_stream.errors -> shared."""
    parts = module.split(".")
    if len(parts) == 1:
        return SHARED
    head = parts[1]
    if head in ("cli", "commands", "__main__"):
        return COMMANDS
    if len(parts) == 2 and not (root / head).is_dir():
        return SHARED
    return head


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            if name == PACKAGE:  # from immich_stream import config, cleanup
                out += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
    return out


def key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    found: dict[int, str] = {}  # one breach a line
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.startswith(KEY_PREFIXES) and " " not in node.value:
                found.setdefault(node.lineno, node.value)
        elif isinstance(node, ast.JoinedStr):
            values = node.values
            if any(isinstance(v, ast.Constant) and " " in str(v.value) for v in values):
                continue  # a message that names a key, not a key
            for a, b in itertools.pairwise(values):
                if (
                    isinstance(a, ast.FormattedValue)
                    and ast.unparse(a.value).endswith("prefix")
                    and isinstance(b, ast.Constant)
                    and str(b.value).startswith("/")
                ):
                    found[node.lineno] = ast.unparse(node)
            first = values[0] if values else None
            if isinstance(first, ast.Constant) and str(first.value).startswith(KEY_PREFIXES):
                found[node.lineno] = ast.unparse(node)
    return sorted(found.items())


def printing(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append((node.lineno, "print()"))
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("stdout", "stderr")
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            found.append((node.lineno, f"sys.{node.attr}"))
    return found


def check(root: Path = ROOT) -> list[str]:
    """One line per breach of the rules above, for the package at `root`."""
    breaches: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        source = path.read_text()
        tree = ast.parse(source, str(rel))
        module = module_name(path, root)
        layer = layer_of(module, root)
        lines = source.count("\n")
        if lines > MAX_LINES:
            breaches.append(f"{rel}: {lines} lines, more than {MAX_LINES}: split it on a seam")
        for line, name in imported(tree, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top == PACKAGE and "." in name:
                target = layer_of(name, root)
                if target not in ALLOWED[layer]:
                    breaches.append(f"{rel}:{line}: {layer} imports {name} ({target}): arrows point down")
            elif top in THIRD_PARTY and layer not in THIRD_PARTY[top]:
                rooms = " and ".join(f"{r}/" for r in sorted(THIRD_PARTY[top]))
                breaches.append(f"{rel}:{line}: imports {top}, which only {rooms} may")
        if layer != "repository":
            for line, text in key_literals(tree):
                breaches.append(f"{rel}:{line}: builds an S3 key ({text}): ask repository/ for it")
        if layer not in PRINTERS and module.rsplit(".", 1)[-1] not in PRINTER_MODULES:
            for line, what in printing(tree):
                breaches.append(f"{rel}:{line}: {what} below the command layer: report through progress.Reporter")
    return breaches


def main() -> int:
    breaches = check()
    for breach in breaches:
        print(breach)
    if breaches:
        print(f"layers: {len(breaches)} breach(es) of the house rules (scripts/layers.py says which)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
