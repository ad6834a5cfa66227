"""README.md and README_zh-CN.md stay in step: each links the other, and both show the same commands.

A command is a line of a fenced shell or Python block (its comment dropped: comments are translated) or an inline
code span that starts like a command (`sweep ...`, `make ...`, ...). A command shown in one README and missing
from the other fails the test, which names the command and the README that lacks it.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
README_ZH = ROOT / "README_zh-CN.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
CODE_LANGUAGES = {"bash", "sh", "shell", "console", "python"}
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
COMMAND_STARTS = ("sweep ", "make ", "xtuner ", "mlflow ", "optuna-dashboard ", ".venv/bin/", "pip ", "uv ",
                  "python ", "bash ", "git ")  # fmt: skip


def _strip_comment(line: str) -> str:
    """The line without its trailing comment; a ``#`` inside quotes is kept."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(text: str) -> dict[str, int]:
    """Each command of a README, with the line it first appears on."""
    found: dict[str, int] = {}

    def add(command: str, offset: int) -> None:
        command = " ".join(command.split())
        if command:
            found.setdefault(command, text.count("\n", 0, offset) + 1)

    fenced = []
    for block in FENCE.finditer(text):
        fenced.append(block.span())
        language = block.group(1).lower()
        if language not in CODE_LANGUAGES:
            continue
        pending, offset = "", block.start(2)
        for raw in block.group(2).splitlines(keepends=True):
            line = _strip_comment(raw.rstrip("\n")).rstrip()
            if line.endswith("\\") and language != "python":
                pending += line[:-1] + " "
            else:
                add(pending + line, offset)
                pending = ""
            offset += len(raw)
    for span in INLINE.finditer(text):
        if any(start <= span.start() < end for start, end in fenced):
            continue
        code = span.group(1).strip()
        if code.startswith(COMMAND_STARTS):
            add(code, span.start())
    return found


def test_each_readme_links_the_other_at_the_top():
    assert "[简体中文](README_zh-CN.md)" in "\n".join(README.read_text(encoding="utf-8").splitlines()[:5])
    assert "[English](README.md)" in "\n".join(README_ZH.read_text(encoding="utf-8").splitlines()[:5])


def test_both_readmes_show_the_same_commands():
    english, chinese = commands(README.read_text(encoding="utf-8")), commands(README_ZH.read_text(encoding="utf-8"))
    assert len(english) > 30, "the parser found too few commands to mean anything"
    problems = [f"README_zh-CN.md lacks `{c}` (README.md line {n})" for c, n in english.items() if c not in chinese]
    problems += [f"README.md lacks `{c}` (README_zh-CN.md line {n})" for c, n in chinese.items() if c not in english]
    assert not problems, "the READMEs are out of step; show each command in both:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```bash\nsweep run a.yaml   # 运行\nmake demo\n```\n", {"sweep run a.yaml", "make demo"}),
        ("```bash\nmlflow server --a x \\\n   --b y\n```\n", {"mlflow server --a x --b y"}),
        ("```bash\necho 'a # b' >> f   # note\n```\n", {"echo 'a # b' >> f"}),
        ("```yaml\nstudy: demo  # x\n```\nText `sweep report demo` and `val/loss`.\n", {"sweep report demo"}),
    ],
)
def test_what_counts_as_a_command(text, expected):
    assert set(commands(text)) == expected
