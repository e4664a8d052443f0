"""Print the functions and classes of Python files with their lengths in lines (nested ones indented).

python scripts/shape.py immich_stream/backup/run.py
"""

from __future__ import annotations

import ast
import sys


def show(node: ast.AST, depth: int = 0) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            kind = "class" if isinstance(child, ast.ClassDef) else "def"
            length = (child.end_lineno or child.lineno) - child.lineno + 1
            print(f"{'  ' * depth}{kind} {child.name}: {length}")
            show(child, depth + 1)


for path in sys.argv[1:]:
    with open(path) as fh:
        source = fh.read()
    print(f"{path}: {len(source.splitlines())} lines")
    show(ast.parse(source))
