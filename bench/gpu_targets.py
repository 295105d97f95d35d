"""Checks a CUDA benchmark run (python -m fastbn.bench --device cuda --json PATH) against the GPU
targets, on the machine that ran it:

  training forward at >= 85% of the copy's bandwidth on large tensors (>= 64 MB);
  training forward >= 1.5x torch where C is below the SM count;
  training forward+backward >= 1.3x torch, median over the run;
  fp16/bf16 channels_last ahead of torch (which picks cuDNN there where it can).

    python bench/gpu_targets.py gpu-resnet50.json [--sm-count N]   (default: this machine's GPU)
"""
import argparse
import json
import statistics
import sys

import torch

DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def _cases(records):
    cases = {}
    for r in records:
        cases.setdefault((r["label"], r["op"]), {})[r["impl"]] = r
    return cases


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--sm-count", type=int, help="multiprocessors of the GPU measured (default: this machine's)")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    records = data["results"] if isinstance(data, dict) else data
    sm_count = args.sm_count or torch.cuda.get_device_properties(0).multi_processor_count
    cases = _cases(records)

    def speedups(select, peer="torch"):
        return [(label, by["fastbn"], by[peer]["median_ms"] / by["fastbn"]["median_ms"])
                for (label, op), by in cases.items() if "fastbn" in by and peer in by and select(op, by["fastbn"])]

    large = [(label, 1 / by["fastbn"]["floor_ratio"]) for (label, op), by in cases.items()
             if op == "train_fwd" and "fastbn" in by and by["fastbn"]["floor_ratio"]
             and _numel(by["fastbn"]["shape"]) * DTYPE_BYTES[by["fastbn"]["dtype"]] >= 64 << 20]
    small_c = speedups(lambda op, r: op == "train_fwd" and r["shape"][1] < sm_count)
    fwd_bwd = speedups(lambda op, r: op == "train_fwd_bwd")
    half_cl = speedups(lambda op, r: r["dtype"] in ("float16", "bfloat16") and r["layout"] == "nhwc"
                       and len(r["shape"]) in (4, 5))

    rows = []

    def check(name, values, target, how):
        if not values:
            rows.append((name, "no cases", "-", "-"))
            return
        measured = how(values)
        rows.append((name, f"{measured:.2f} ({len(values)} cases, min {min(values):.2f})", f">= {target}",
                     "met" if measured >= target else "NOT met"))

    check("train fwd, share of copy bandwidth (>= 64 MB)", [v for _, v in large], 0.85, min)
    check(f"train fwd vs torch, C < {sm_count} SMs", [v for _, _, v in small_c], 1.5, min)
    check("train fwd+bwd vs torch, median", [v for _, _, v in fwd_bwd], 1.3, statistics.median)
    check("fp16/bf16 channels_last vs torch/cuDNN, all ops", [v for _, _, v in half_cl], 1.0, min)
    # fastbn's two CUDA paths, where the run forced each (FASTBN_CUDA_PERSISTENT=1 or 0): the
    # persistent one's speed-up over the two-pass one, and how far the default's choice by shape falls
    # behind the better of the two, per op, so that the rule can follow what the GPU shows.
    def times(op, *impls):  # per case: the impls' median times, where the run measured them all
        return [[by[i]["median_ms"] for i in impls] for (label, o), by in cases.items()
                if o == op and all(i in by for i in impls)]

    for op in ("train_fwd", "train_fwd_bwd"):
        gains = [two_pass / persistent for two_pass, persistent in times(op, "fastbn_two_pass", "fastbn_persistent")]
        behind = [chosen / min(two_pass, persistent)
                  for chosen, two_pass, persistent in times(op, "fastbn", "fastbn_two_pass", "fastbn_persistent")]
        for name, values in ((f"{op}: persistent speed-up over two-pass", gains),
                             (f"{op}: default / best of the two", behind)):
            if values:
                rows.append((name, f"{statistics.median(values):.2f} ({len(values)} cases, "
                             f"{min(values):.2f}-{max(values):.2f})", "-", "(information)"))
    width = max(len(r[0]) for r in rows)
    print(f"{'target':<{width}}  {'measured (worst or median)':<36} {'goal':<8} result")
    for name, measured, goal, result in rows:
        print(f"{name:<{width}}  {measured:<36} {goal:<8} {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
