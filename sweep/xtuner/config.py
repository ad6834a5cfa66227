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
        raise SpecError(f"base_config {path}: mmengine could not load it: {err}") from None


def _built(value: Any, key: str | None = None) -> Any:
    """Plain values with real objects: mmengine keeps a pure-Python config's imports as lazy proxies.

    A ``type`` (what mmengine builds: always a class or function) that the config imported by name stays that import
    path where the module's source visibly defines or imports the name: the trial's process imports it, the sweep's
    checks need not (XTuner's model, PEFT and bitsandbytes are most of their imports). Any other, or one that cannot
    be seen in the source, is imported here, and an import that fails is the config's error, as before."""
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
    """``module.Name`` of ``from module import Name`` where the module's source shows the name, else None."""
    module, name = getattr(lazy, "_module", None), getattr(lazy, "_imported", None)
    if type(lazy).__name__ != "LazyObject" or not isinstance(module, str) or not name:
        return None
    return f"{module}.{name}" if name in _names_in_source(module) else None


@functools.cache
def _names_in_source(module: str) -> frozenset[str]:
    """The names a module's own source binds at its top level (defs, classes, assignments, imports, also inside
    ``if``/``try`` blocks), read without importing it or its packages (``_source_file``). Empty where there is no
    such file or it binds names it cannot show (``import *``)."""
    import ast

    try:
        origin = _source_file(module)
        tree = ast.parse(Path(origin).read_text(encoding="utf-8")) if origin else None
    except (ImportError, ValueError, OSError, SyntaxError):
        return frozenset()
    if tree is None:
        return frozenset()
    names: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return frozenset()
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            statements.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            statements.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
    return frozenset(names)


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
