"""Expand a Slurm node list ("gpu[01-03,07],login1") into one host per line; used where scontrol is absent."""
from __future__ import annotations

import re
import sys


def _split_top(nodelist: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    return parts + [cur] if cur else parts


def expand(nodelist: str) -> list[str]:
    hosts = []
    for part in _split_top(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


if __name__ == "__main__":
    print("\n".join(expand(sys.argv[1])))
