"""XTuner configs as mmengine loads them: a zoo name or the user's file, its values, the prompt templates."""

from __future__ import annotations

import difflib
import functools
import os
import threading
from pathlib import Path
from typing import Any

from sweep.errors import SpecError

# CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per thread: two threads
# parsing at once (trials of --n-jobs rendering and loading configs) can fail one with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905; it failed a CI run). Every parse of a
# config in the sweep process (ast.literal_eval here, mmengine's Config.fromfile) holds this lock.
PARSE_LOCK = threading.Lock()


def resolve_base_config(name_or_path: str) -> Path:
    """A config-zoo name (as ``xtuner list-cfg`` prints) or a file path, as a file path."""
    path = Path(name_or_path)
    if path.suffix == ".py" or os.sep in name_or_path:
        if not path.is_file():
            raise SpecError(f"base_config: file {path} not found")
        return path
    from xtuner.configs import cfgs_name_path

    if name_or_path in cfgs_name_path:
        return Path(cfgs_name_path[name_or_path])
    close = difflib.get_close_matches(name_or_path, list(cfgs_name_path), n=3)
    hint = f"; did you mean {close}?" if close else "; `xtuner list-cfg` lists them"
    raise SpecError(f"base_config: {name_or_path!r} is neither a file nor an XTuner config name{hint}")


def load_config(path: Path):
    """mmengine's ``Config.fromfile``, one thread at a time (see ``PARSE_LOCK``)."""
    from mmengine.config import Config

    with PARSE_LOCK:
        return Config.fromfile(str(path))


def load_base_config(name_or_path: str) -> dict[str, Any]:
    """Execute the base config with mmengine (it is the user's own code) and return its values."""
    path = resolve_base_config(name_or_path)
    try:
        cfg = load_config(path)
        return {
            name: _built(value)
            for name, value in dict.items(cfg._cfg_dict)
            if type(value).__name__ != "LazyObject"  # a top-level import of the base config, not a setting
        }
    except Exception as err:  # the user's file: any error is theirs to see, with the file named
        raise SpecError(f"base_config {path}: mmengine could not load it or import what it names: {err}") from None


def _built(value: Any, key: str | None = None) -> Any:
    """Plain values with real objects: mmengine keeps a pure-Python config's imports as lazy proxies.

    A ``type`` (what mmengine builds: always a class or function) that the config imported by name stays that import
    path where the sources alone show mmengine will find it there (``_import_path_unbuilt``): the trial's process
    imports it, the sweep's checks need not (XTuner's model, PEFT and bitsandbytes are most of their imports). Any
    other is imported here, and an import that fails is the config's error, as before. What the sources cannot show
    (a package that breaks on import, a name deleted at run time) then fails in the first trial, not here."""
    if type(value).__name__ in ("LazyObject", "LazyAttr"):
        if key == "type" and (path := _import_path_unbuilt(value)) is not None:
            return path
        return _built(value.build())
    if isinstance(value, dict):
        return {k: _built(v, k) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [_built(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_built(v) for v in value)
    return value


def _import_path_unbuilt(lazy: Any) -> str | None:
    """``module.Name`` of the config's ``from module import Name``, where mmengine's ``get_object_from_string`` will
    walk that path to that module and take ``Name`` from it: the module's source binds ``Name``, and no package on the
    way binds an attribute named like the next part (a package that re-exports a function under its submodule's name,
    as XTuner's ``collate_fns`` does, would stop the walk at the function). None where a source cannot tell."""
    module, name = getattr(lazy, "_module", None), getattr(lazy, "_imported", None)
    if type(lazy).__name__ != "LazyObject" or not isinstance(module, str) or not name:
        return None
    parts = module.split(".")
    for i in range(1, len(parts)):
        above = _names_in_source(".".join(parts[:i]))
        if above is None or parts[i] in above:
            return None
    names = _names_in_source(module)
    return f"{module}.{name}" if names is not None and name in names else None


@functools.cache
def _names_in_source(module: str) -> frozenset[str] | None:
    """The names a module's own source binds at its top level (defs, classes, assignments, imports, also inside
    ``if``/``try``/``with`` blocks; not under ``if TYPE_CHECKING:``, not a bare annotation, not one it deletes), read
    without importing it or its packages (``_source_file``). None where it cannot tell: no source file, a source that
    does not parse, or an ``import *`` of a module whose ``__all__`` is not a literal list."""
    import ast

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


def _absolute(module: str, origin: str, node: Any) -> str:
    """The module a ``from ... import *`` in ``module`` (whose source is ``origin``) names."""
    if not node.level:
        return node.module
    package = module if Path(origin).name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


@functools.cache
def _exported_names(module: str) -> frozenset[str] | None:
    """The literal ``__all__`` of a module's source (what its ``import *`` binds), or None where there is none."""
    import ast

    parsed = _parsed_source(module)
    if parsed is None:
        return None
    tree = parsed[1]
    try:
        values = [node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]  # fmt: skip
        changed = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)  # __all__.extend(...) and such
                   and isinstance(node.value, ast.Name) and node.value.id == "__all__"]  # fmt: skip
        augmented = [node for node in tree.body if isinstance(node, ast.AugAssign)
                     and isinstance(node.target, ast.Name) and node.target.id == "__all__"]  # fmt: skip
        if len(values) != 1 or changed or augmented:
            return None
        with PARSE_LOCK:
            return frozenset(ast.literal_eval(values[0]))
    except Exception:  # noqa: BLE001 - a computed __all__: cannot tell
        return None


def _parsed_source(module: str) -> tuple[str, Any] | None:
    """A module's source file and its syntax tree, read without importing it; None where either cannot be had."""
    import ast

    try:
        origin = _source_file(module)
        if origin is None:
            return None
        text = Path(origin).read_text(encoding="utf-8")
        with PARSE_LOCK:
            return origin, ast.parse(text)
    except Exception:  # noqa: BLE001 - anything unreadable is "cannot tell": the value is then imported
        return None


def _source_file(module: str) -> str | None:
    """The ``.py`` file ``import module`` would run, found on disk from its top-level package's folders: a
    submodule's ``find_spec`` would run every package above it (``xtuner.engine`` alone imports XTuner's models)."""
    import importlib.util

    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported to find it
    if spec is None:
        return None
    if not rest:
        return spec.origin if spec.origin and spec.origin.endswith(".py") else None
    folders = [Path(d) for d in spec.submodule_search_locations or []]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        package = next((d / part for d in folders if (d / part / "__init__.py").is_file()), None)
        if last:
            if package is not None:
                return str(package / "__init__.py")
            return next((str(d / f"{part}.py") for d in folders if (d / f"{part}.py").is_file()), None)
        if package is None:
            return None
        folders = [package]
    return None


def prompt_template(name: str) -> dict[str, Any]:
    from xtuner.utils import PROMPT_TEMPLATE

    if name not in PROMPT_TEMPLATE:
        close = difflib.get_close_matches(name, list(PROMPT_TEMPLATE), n=3)
        raise SpecError(f"model.template: unknown XTuner prompt template {name!r}; close names: {close}")
    return dict(PROMPT_TEMPLATE[name])
