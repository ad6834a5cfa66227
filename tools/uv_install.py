"""`uv pip install ARGS` with pip's package sources: the Makefile's one-step install of the environment.

uv reads no pip configuration, so a machine whose pip is set up with a mirror, local indexes, wheel folders,
constraints or a certificate bundle would have uv go elsewhere (and, for torch, download gigabytes that lie on
disk). This hands pip's settings, as ``pip config list`` shows them (environment first, then ``install`` over
``global``), to uv's own variables, and lets uv take the best version across the indexes, as pip does.

Usage: ``python tools/uv_install.py UV_PIP_INSTALL_ARGS...`` (run by the venv's python; uv lies beside it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

#: pip's setting -> (uv's variable, how uv separates several values)
SETTINGS = {
    "index-url": ("UV_DEFAULT_INDEX", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "cert": ("SSL_CERT_FILE", " "),
}
SECTIONS = (":env:", "install", "global")  # pip's precedence, first wins


def pip_settings() -> dict[str, str]:
    """pip's effective value of each setting in ``SETTINGS``, from ``pip config list``."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = str(ast.literal_eval(value.strip()))
    settings = {}
    for name in SETTINGS:
        for section in SECTIONS:
            if f"{section}.{name}" in found:
                settings[name] = found[f"{section}.{name}"]
                break
    return settings


def uv_environment(settings: dict[str, str]) -> dict[str, str]:
    """uv's variables for pip's settings; a variable already set for uv is left as it is."""
    env = {}
    for name, value in settings.items():
        variable, separator = SETTINGS[name]
        if value.split() and variable not in os.environ:
            env[variable] = separator.join(value.split())
    return env


def main(argv: list[str]) -> int:
    uv = Path(sys.executable).with_name("uv")
    env = {**os.environ, "UV_INDEX_STRATEGY": os.environ.get("UV_INDEX_STRATEGY", "unsafe-best-match")}
    env.update(uv_environment(pip_settings()))
    return subprocess.run([str(uv), "pip", "install", "--python", sys.executable, *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
