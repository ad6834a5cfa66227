"""The environment `make setup` resolves in one step: XTuner's one wrong pin replaced, nothing else broken."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

from tests.conftest import ROOT

#: What `pip check` says of the pin overrides.txt replaces; the README explains it.
KNOWN = re.compile(r"^xtuner 0\.2\.0 has requirement bitsandbytes==0\.45\.0, but you have bitsandbytes \S+\.$")


def _overrides() -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "overrides.txt").read_text().splitlines())
    return dict(line.split("==") for line in lines if line)


def test_pip_check_reports_only_xtuners_bitsandbytes_pin():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    unexpected = [line for line in lines if not KNOWN.match(line)]
    assert lines and out.returncode == 1, f"pip check ran and reported XTuner's pin (rc {out.returncode}): {out.stderr}"
    assert not unexpected, "pip check reports conflicts besides XTuner's bitsandbytes pin:\n" + "\n".join(unexpected)


def test_each_override_replaces_a_pin_of_xtuner_and_is_installed():
    requires = metadata.requires("xtuner") or []
    for name, version in _overrides().items():
        pins = [r for r in requires if re.match(rf"{re.escape(name)}\s*==", r, re.I) and "extra ==" not in r]
        assert pins and all(f"=={version}" not in p for p in pins), f"overrides.txt: {name} overrides no pin of XTuner"
        assert metadata.version(name) == version, f"{name} {metadata.version(name)} is installed, not the override"
