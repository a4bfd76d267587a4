#!/usr/bin/env python3
"""Plots `parley bench --room-members ...` output (its final table, on stdin) as a PNG.

Usage: parley bench --room-members 10,100,500,1000,2000,5000 | bench/plot-rooms.py docs/img/big-rooms.png
Needs matplotlib (pip install matplotlib).
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ["create room", "add member", "add (hub)", "member joins", "fan-out 1 msg",
           "fan-out (hub)", "remove member", "remove (hub)"]

lines = sys.stdin.read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith("room members")) + 1
rows = [list(map(float, l.split())) for l in lines[start:] if l.strip() and l.split()[0].isdigit()]
sizes = [r[0] for r in rows]
fig, ax = plt.subplots(figsize=(8, 5))
for i, name in enumerate(COLUMNS, start=1):
    if name == "create room":
        continue
    ax.plot(sizes, [r[i] for r in rows], marker="o", label=name)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("member devices in the room")
ax.set_ylabel("ms (median of 3)")
ax.set_title("Parley: cost of one operation in a room, by room size")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
