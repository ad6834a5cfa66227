"""XTuner configs as mmengine loads them: a zoo name or the user's file, its values, the prompt templates."""

from __future__ import annotations

import difflib
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
    from sweep.xtuner import source_names  # it takes PARSE_LOCK from here

    parts = module.split(".")
    for i in range(1, len(parts)):
        above = source_names.names_in_source(".".join(parts[:i]))
        if above is None or parts[i] in above:
            return None
    names = source_names.names_in_source(module)
    return f"{module}.{name}" if names is not None and name in names else None


def prompt_template(name: str) -> dict[str, Any]:
    from xtuner.utils import PROMPT_TEMPLATE

    if name not in PROMPT_TEMPLATE:
        close = difflib.get_close_matches(name, list(PROMPT_TEMPLATE), n=3)
        raise SpecError(f"model.template: unknown XTuner prompt template {name!r}; close names: {close}")
    return dict(PROMPT_TEMPLATE[name])
