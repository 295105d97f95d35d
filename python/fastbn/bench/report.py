"""The table at the end of a run, the JSON records and the plot."""
import json

from .impls import PEERS


def _groups(records):
    groups = {}
    for r in records:
        groups.setdefault((r["label"], r["op"]), {})[r["impl"]] = r
    return groups


def table(records):
    """One line per (case, op): ms per implementation, fastbn's speed-up over the best peer and
    its time as a multiple of the floor (one copy of the input)."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    width = {i: max(10, len(i) + 1) for i in impls}  # fastbn_persistent and the like need more than 10
    head = f"{'case':<30} {'op':<14}" + "".join(f"{i:>{width[i]}}" for i in impls) + f"{'vs best':>9}{'x floor':>9}"
    lines = [head, "-" * len(head)]
    for (label, op), by_impl in _groups(records).items():
        cells = "".join(f"{by_impl[i]['median_ms']:>{width[i]}.3f}" if i in by_impl else f"{'-':>{width[i]}}"
                        for i in impls)
        ours = by_impl.get("fastbn")
        peers = [by_impl[p]["median_ms"] for p in PEERS if p in by_impl]
        speedup = f"{min(peers) / ours['median_ms']:>8.2f}x" if ours and peers else f"{'-':>9}"
        floor = f"{ours['floor_ratio']:>8.2f}x" if ours and ours["floor_ratio"] else f"{'-':>9}"
        lines.append(f"{label:<30} {op:<14}{cells}{speedup}{floor}")
    return "\n".join(lines)


def write_json(records, path, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1)


def write_plot(records, path, title):
    """Median time per case for every implementation (markers, log scale), one panel per op, with
    the floor (one copy of the input) drawn as a black dash on each case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}") from None
    groups = _groups(records)
    labels = list(dict.fromkeys(label for label, _ in groups))
    ops = list(dict.fromkeys(op for _, op in groups))
    impls = [i for i in dict.fromkeys(r["impl"] for r in records) if i != "floor"]
    fig, axes = plt.subplots(len(ops), 1, squeeze=False, sharex=True,
                             figsize=(min(24, max(8, 0.22 * len(labels) + 3)), 2.8 * len(ops) + 1.5))
    for ax, op in zip(axes[:, 0], ops):
        for impl in impls:
            points = [(k, groups[(label, op)][impl]["median_ms"]) for k, label in enumerate(labels)
                      if impl in groups.get((label, op), {})]
            ax.plot([k for k, _ in points], [ms for _, ms in points], "o", markersize=3.5, label=impl)
        floors = [(k, groups[(label, op)]["floor"]["median_ms"]) for k, label in enumerate(labels)
                  if "floor" in groups.get((label, op), {})]
        ax.plot([k for k, _ in floors], [ms for _, ms in floors], "_", color="black", markersize=10,
                markeredgewidth=2, label="floor (copy)")
        ax.set_yscale("log")
        ax.set_ylabel(f"{op}\nmedian ms")
        ax.grid(True, which="major", axis="y", alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=7, ncol=len(impls) + 1, loc="upper left")
    axes[-1, 0].set_xticks(range(len(labels)))
    axes[-1, 0].set_xticklabels(labels, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
