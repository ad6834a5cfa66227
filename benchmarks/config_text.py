"""What writing a trial's config out costs, with and without yapf (``launcher._plain_config_text``).

    .venv/bin/python benchmarks/config_text.py [REPEATS]     # CPU, about 10 s

mmengine turns the runner's config back into text (``Config.pretty_text``) for its config dump, the
visualizer, the environment log and every checkpoint's metadata, and formats it with yapf each time.
This renders the demo's trial config (``sweep validate``), times ``pretty_text`` formatted and plain,
and checks that the plain text loads back to the same config.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import cli, launcher  # noqa: E402


def _seconds(config_file: Path, repeats: int) -> tuple[float, str]:
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_file))
    start = time.perf_counter()
    for _ in range(repeats):
        text = cfg.pretty_text
    return (time.perf_counter() - start) / repeats, text


def main() -> None:
    from mmengine.config import Config

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "trial.py"
        if cli.main(["validate", str(ROOT / "configs" / "demo.yaml"), "--output", str(rendered)]) != 0:
            sys.exit("sweep validate failed")
        formatted, _ = _seconds(rendered, repeats)
        launcher.prepare_process()  # what every training process does first
        plain, text = _seconds(rendered, repeats)
        back = Path(tmp) / "back.py"
        back.write_text(text, encoding="utf-8")
        same = Config.fromfile(str(back)).to_dict() == Config.fromfile(str(rendered)).to_dict()
    print(f"config text: {len(text):,} characters")
    print(
        f"pretty_text formatted by yapf: {formatted:.3f} s per call; plain: {plain:.4f} s ({formatted / plain:,.0f}x)"
    )
    print(f"plain text loads back to the same config: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
