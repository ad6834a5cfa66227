"""A config written as ``name = <literal>`` lines: data that can never run as code.

Objects become the dotted import paths mmengine's registries resolve; every right-hand side is checked
with ``ast.literal_eval`` before the file is written, so no value from a spec or a data file can run.
"""

from __future__ import annotations

import ast
import math
import pprint
import re
import types
from typing import Any

from sweep.errors import SpecError
from sweep.xtuner.config import PARSE_LOCK


def _literal(value: Any, where: str) -> Any:
    """A value as plain data: callables become the dotted paths mmengine's registries import."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(f"config key {where}: {value} cannot be written as a literal")
        return value
    if isinstance(value, dict):
        return {str(k): _literal(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_literal(v, f"{where}[{i}]") for i, v in enumerate(value))
    try:
        import torch

        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(value, types.MethodType) and isinstance(value.__self__, type):
        owner = value.__self__
        return _import_path(value, owner.__module__, f"{owner.__qualname__}.{value.__name__}", where)
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return _import_path(value, value.__module__, value.__qualname__, where)
    raise SpecError(f"config key {where}: a {type(value).__name__} cannot be written as a literal value")


def _import_path(obj: Any, module: str, qualname: str, where: str) -> str:
    """The shortest dotted path that mmengine's ``get_object_from_string`` turns back into ``obj``.

    The shortest public one matters: XTuner re-exports functions under their module's own name
    (``xtuner.dataset.collate_fns.default_collate_fn`` is the function, not the module), so the
    long ``__module__`` path does not resolve.
    """
    from mmengine.utils import get_object_from_string

    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        path = ".".join(parts[:i] + [qualname])
        try:
            found = get_object_from_string(path)
        except Exception:  # noqa: BLE001 - a prefix that does not import is just not the path
            continue
        if found is obj or (found is not None and found == obj):
            return path
    raise SpecError(f"config key {where}: {module}.{qualname} cannot be imported back by its dotted path")


#: mmengine's ``Config.fromfile`` rewrites a config's text before it parses it: ``{{ fileDirname }}`` and friends,
#: ``{{$VAR:default}}`` (also quoted) and ``{{_base_.key}}`` are filled in wherever they stand, inside string
#: literals too. Every such placeholder starts with two braces; in a rendered config two braces can only stand
#: inside a string literal (a dict opens with ``{'``), where ``\x7b`` is the same character.
_DOUBLE_BRACE = re.compile(r"\{(?=\{)")


def to_source(cfg: dict[str, Any]) -> str:
    """Write a config as ``name = literal`` lines; imported names of the base config are dropped.

    Strings from a spec or a data file (probes, the system prompt, paths) reach training with exactly their
    value: each right-hand side is proven to be data that evaluates back to the value, and no text is left
    that mmengine would substitute (``_DOUBLE_BRACE``).
    """
    lines = ["# Rendered by xtuner-sweep: literal values only. Types are import paths mmengine resolves.\n"]
    for name, value in cfg.items():
        if isinstance(value, (types.ModuleType, type, types.FunctionType, types.MethodType)):
            continue  # an import of the base config, not a setting
        if not name.isidentifier():
            raise SpecError(f"config key {name!r} is not a Python identifier")
        literal = _literal(value, name)
        text = _DOUBLE_BRACE.sub(r"\\x7b", pprint.pformat(literal, width=100, sort_dicts=False))
        with PARSE_LOCK:
            back = ast.literal_eval(text)  # proves the right-hand side is data, never code
        if back != literal:
            raise SpecError(f"config key {name}: its value does not survive being written as a literal")
        lines.append(f"{name} = {text}\n")
    return "".join(lines)
