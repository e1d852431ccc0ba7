"""Print pip constraints that pin every runtime requirement of setup.cfg to its lowest declared release line.

``transformers>=4.56`` becomes ``transformers==4.56.*`` (the newest 4.56.x: a bound is a promise about a release
line, and its bug-fix releases are what a user gets). torch is left out: this machine's disk has only the
``torch==2.13.0`` CPU wheel, and PyPI's older ones are multi-GB CUDA builds (docs/development.md says so).
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SKIPPED = {"torch"}


def lowest_pins(setup_cfg: Path) -> list[str]:
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    pins = []
    for line in config["options"]["install_requires"].strip().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*(,.*)?", line)
        if match is None:
            sys.exit(f"no lower bound to pin in setup.cfg's requirement {line.strip()!r}")
        name, version = match.group(1), match.group(2)
        if name not in SKIPPED:
            pins.append(f"{name}=={version}.*")
    return pins


if __name__ == "__main__":
    print("\n".join(lowest_pins(Path(__file__).resolve().parent.parent / "setup.cfg")))
