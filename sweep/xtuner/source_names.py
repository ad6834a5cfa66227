"""The names a module binds, read from its source file without importing it or the packages above it.

The sweep's checks use it to keep a base config's ``type=`` imports as import paths (``sweep.xtuner.config``): what
cannot be told from the sources is answered None, and the caller imports the object instead.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from sweep.xtuner.config import PARSE_LOCK


@functools.cache
def names_in_source(module: str) -> frozenset[str] | None:
    """The names a module's own source binds at its top level (defs, classes, assignments, imports, also inside
    ``if``/``try``/``with`` blocks; not under ``if TYPE_CHECKING:``, not a bare annotation, not one it deletes). None
    where it cannot tell: no source file, a source that does not parse, or an ``import *`` of a module whose
    ``__all__`` is not a literal list."""
    parsed = _parsed_source(module)
    if parsed is None:
        return None
    origin, tree = parsed
    names: set[str] = set()
    deleted: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            exported = _exported_names(_absolute(module, origin, node))
            if exported is None:
                return None
            names.update(exported)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign) or (isinstance(node, ast.AnnAssign) and node.value is not None):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, ast.Delete):
            deleted.update(t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, ast.If):
            test = node.test
            type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            )
            statements.extend(node.orelse if type_checking else node.body + node.orelse)
        elif isinstance(node, (ast.Try, ast.With)):
            statements.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            statements.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
    return frozenset(names - deleted)


def _absolute(module: str, origin: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import *`` in ``module`` (whose source is ``origin``) names."""
    if not node.level:
        return node.module or ""
    package = module if Path(origin).name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _exported_names(module: str) -> frozenset[str] | None:
    """The literal ``__all__`` of a module's source (what its ``import *`` binds), or None where there is none or it
    is changed after it is assigned."""
    parsed = _parsed_source(module)
    if parsed is None:
        return None
    tree = parsed[1]
    values = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]  # fmt: skip
    changed = any(isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "__all__"
                  for node in ast.walk(tree))  # fmt: skip  # __all__.extend(...) and such
    augmented = any(isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name)
                    and node.target.id == "__all__" for node in tree.body)  # fmt: skip
    if len(values) != 1 or changed or augmented:
        return None
    try:
        return frozenset(ast.literal_eval(values[0]))
    except (ValueError, TypeError):  # a computed __all__: cannot tell
        return None


@functools.cache
def _parsed_source(module: str) -> tuple[str, ast.Module] | None:
    """A module's source file and its syntax tree; None where either cannot be had."""
    try:
        origin = source_file(module)
        if origin is None:
            return None
        text = Path(origin).read_text(encoding="utf-8")
        with PARSE_LOCK:  # the AST constructor is not safe in two threads at once (sweep.xtuner.config)
            return origin, ast.parse(text)
    except Exception:  # noqa: BLE001 - anything unreadable is "cannot tell": the value is then imported
        return None


def source_file(module: str) -> str | None:
    """The ``.py`` file ``import module`` would run, found on disk from its top-level package's folders (a package
    folder before a module file, as Python looks): a submodule's ``find_spec`` would run every package above it
    (``xtuner.engine`` alone imports XTuner's models)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported to find it
    if spec is None:
        return None
    if not rest:
        return spec.origin if spec.origin and spec.origin.endswith(".py") else None
    folders = [Path(d) for d in spec.submodule_search_locations or []]
    for part in rest[:-1]:
        folders = [d / part for d in folders if (d / part / "__init__.py").is_file()][:1]
    for folder in folders:
        for candidate in (folder / rest[-1] / "__init__.py", folder / f"{rest[-1]}.py"):
            if candidate.is_file():
                return str(candidate)
    return None
