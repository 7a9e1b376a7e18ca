"""Write constraints.txt from `pip install --dry-run --report` (see `make lock`).

One line `name==version` per package pip resolved for hubquant with every extra, torch pinned by
version alone: no local tag (`+cpu`), index URL or path of the machine that made it, so the same
file serves a CPU machine and a GPU box (where torch's own CUDA dependencies, pinned exactly by torch,
come along unlisted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = """\
# hubquant's lock: every package `make eval`, `make test`, `make bench` and CI install, pinned.
# Written by `make lock` (pip's resolution of `.[test,scale,bench]` with torch=={torch}), which then
# runs the suite; edit by re-running it, not by hand. Use it for your own install with
#   pip install -c constraints.txt 'hubquant[...]'
# or leave `-c` out for the latest libraries (untested combinations).
"""


def main(report: str, out: str) -> None:
    installs = json.loads(Path(report).read_text())["install"]
    pins = {}
    for item in installs:
        name = item["metadata"]["name"].lower().replace("_", "-")
        if name == "hubquant":
            continue
        pins[name] = item["metadata"]["version"].split("+")[0]
    text = HEADER.format(torch=pins["torch"]) + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    Path(out).write_text(text)
    print(f"wrote {out}: {len(pins)} packages")


if __name__ == "__main__":
    main(*sys.argv[1:])
