#!/usr/bin/env python3
"""Plots the lab's throughput sweep: network training tokens/s against node count, with the
linear line through the first point (what perfect scaling would give).

    python3 scripts/lab-plot.py target/lab-scale/scale.csv docs/lab-throughput.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    if not rows:
        sys.exit(f"{src}: no rows")
    nodes = [int(r["nodes"]) for r in rows]
    tps = [float(r["tokens_per_s"]) for r in rows]
    per_node = tps[0] / nodes[0] if nodes[0] else 0.0
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(nodes, tps, "o-", label="measured")
    ax.plot(nodes, [per_node * n for n in nodes], "--", color="grey", label="linear from the first point")
    ax.set_xscale("log", base=2)
    ax.set_xticks(nodes)
    ax.set_xticklabels([str(n) for n in nodes])
    ax.set_xlabel("nodes (each under the same CPU quota)")
    ax.set_ylabel("network training tokens/s")
    ax.set_title("NeuroShard lab: throughput against node count (tiny model)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: lab-plot.py SCALE_CSV OUT_PNG")
    main(sys.argv[1], sys.argv[2])
