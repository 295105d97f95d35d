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
    head = f"{'case':<30} {'op':<14}" + "".join(f"{i:>10}" for i in impls) + f"{'vs best':>9}{'x floor':>9}"
    lines = [head, "-" * len(head)]
    for (label, op), by_impl in _groups(records).items():
        cells = "".join(f"{by_impl[i]['median_ms']:>10.3f}" if i in by_impl else f"{'-':>10}" for i in impls)
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
    """Time per (case, op) per implementation on a log axis, the floor drawn as a black tick."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}") from None
    groups = _groups(records)
    impls = [i for i in dict.fromkeys(r["impl"] for r in records) if i != "floor"]
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups)), 5))
    for k, impl in enumerate(impls):
        xs = [g + (k - (len(impls) - 1) / 2) * width for g, by in enumerate(groups.values()) if impl in by]
        ys = [by[impl]["median_ms"] for by in groups.values() if impl in by]
        ax.bar(xs, ys, width, label=impl)
    floors = [(g, by["floor"]["median_ms"]) for g, by in enumerate(groups.values()) if "floor" in by]
    if floors:
        ax.scatter([g for g, _ in floors], [ms for _, ms in floors], marker="_", s=600, color="black",
                   zorder=3, label="floor (copy)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{label}\n{op}" for label, op in groups], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
