"""Print `uv pip install` flags for the package sources pip is configured with on this machine.

uv installs the environment about 10x faster than pip (`make setup`), but it does not read pip's
configuration (pip.conf files, PIP_* variables). Machines that point pip at local wheels or a
mirror (find-links, index-url, extra-index-url, constraint) would give uv other sources, or other
versions, than pip. This reads `pip config list` (run with the interpreter given, default this
one) and prints the same settings as uv flags, one per line, quoted for a shell.

    uv pip install --python .venv/bin/python $(python .ci/uv_flags.py) -e .
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

# pip option -> uv flag; each value of a list option (space separated) becomes one flag
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}
LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<name>[a-z-]+)='(?P<value>.*)'$")


def uv_flags(config_lines: list[str]) -> list[str]:
    """The uv flags for `pip config list` lines (global, install, :env: scopes alike), each
    value once, in the order pip lists them."""
    out: list[str] = []
    for line in config_lines:
        m = LINE.match(line.strip())
        if not m or m["name"] not in FLAGS or m["scope"] not in ("global", "install", ":env:"):
            continue
        for value in m["value"].split():
            pair = [FLAGS[m["name"]], value]
            if not any(out[i:i + 2] == pair for i in range(0, len(out), 2)):
                out += pair
    return out


def main() -> int:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    print(" ".join(shlex.quote(part) for part in uv_flags(listed.stdout.splitlines())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
