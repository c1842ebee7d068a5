#!/usr/bin/env python3
"""Plots the lab's throughput sweeps: network training tokens/s against node count, one line
per sweep (a scale.csv of `lab scale`), each with the linear line through its first point
(what perfect scaling would give).

    python3 scripts/lab-plot.py docs/lab-throughput.png \
        target/lab-scale-full/scale.csv="full replicas" target/lab-scale-pipe/scale.csv="2-stage pipelines"
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(src):
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{src}: no rows")
    return [int(r["nodes"]) for r in rows], [float(r["tokens_per_s"]) for r in rows]


def main(dst, sources):
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ticks = set()
    for i, spec in enumerate(sources):
        src, _, label = spec.partition("=")
        nodes, tps = read(src)
        ticks.update(nodes)
        color = f"C{i}"
        per_node = tps[0] / nodes[0]
        ax.plot(nodes, tps, "o-", color=color, label=label or src)
        ax.plot(nodes, [per_node * n for n in nodes], ":", color=color, alpha=0.6,
                label=f"linear from its first point")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([str(n) for n in sorted(ticks)])
    ax.set_xlabel("nodes (each under the same CPU quota)")
    ax.set_ylabel("network training tokens/s")
    ax.set_title("NeuroShard lab: throughput against node count (tiny model)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: lab-plot.py OUT_PNG SCALE_CSV[=LABEL]...")
    main(sys.argv[1], sys.argv[2:])
