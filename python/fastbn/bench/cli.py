"""python -m fastbn.bench: fastbn against torch, inductor, a naive BatchNorm and the copy floor."""
import argparse
import contextlib
import os
import platform
import sys

import torch

import fastbn

from .cases import DTYPES, OPS, PRESETS, parse_shape, preset_cases
from .distributed import distributed_table, run_distributed_bench
from .fused import SHAPES as FUSED_SHAPES
from .fused import fused_table, run_fused, run_memory
from .impls import IMPLS, default_impls
from .inference import inference_table, run_inference
from .overhead import MODULES as OVERHEAD_MODULES
from .overhead import SHAPE as OVERHEAD_SHAPE
from .overhead import overhead_table, run_overhead
from .report import table, write_json, write_plot
from .runner import keep_freed_memory, run_cases


def _list(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def _shape(text):
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fastbn.bench", description=__doc__,
        epilog="Medians of interleaved calls, each after evicting the caches; the garbage collector is off "
               "while timing. On the CPU freed memory is kept by glibc so outputs reuse their pages "
               "(kernel time); --fresh-pages measures end to end, page faults included.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--shape", action="append", type=_shape, metavar="NxCxHxW",
                   help="measure this shape instead of the preset's (repeatable)")
    p.add_argument("--dtype", type=_list(list(DTYPES)), help="comma list; default: the preset's")
    p.add_argument("--layout", type=_list(["nchw", "nhwc"]), help="nchw, nhwc or both (default: the preset's)")
    p.add_argument("--ops", type=_list(list(OPS)), default=list(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--impls", type=_list(list(IMPLS)),
                   help="comma list of " + ", ".join(IMPLS) + " (default: all; on CUDA only: torch_native, torch "
                        "with cuDNN off; fastbn_persistent and fastbn_two_pass, fastbn with "
                        "FASTBN_CUDA_PERSISTENT=1 or 0)")
    p.add_argument("--inference", action="store_true",
                   help="instead of the ops: a small ResNet in eval mode with torch's BatchNorm, fastbn's, and "
                        "folded into the convolutions (fastbn.fold)")
    p.add_argument("--fused", action="store_true",
                   help="instead of the ops: fused BN+ReLU and BN+add+ReLU training steps against torch's and "
                        "fastbn's unfused ones, and the autograd-saved memory of a Conv-BN-LeakyReLU stack")
    p.add_argument("--overhead", action="store_true",
                   help="instead of the ops: the per-call cost of a BatchNorm2d on a tiny input, back-to-back calls "
                        "(the Python, dispatcher and autograd work around the kernels), torch against fastbn")
    p.add_argument("--sync", action="store_true",
                   help="instead of the ops: fastbn.SyncBatchNorm across --world-size gloo processes on this "
                        "machine (bytes sent per layer, step time against unsynchronized BatchNorm)")
    p.add_argument("--world-size", type=int, default=2, help="processes for --sync (default 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU)")
    p.add_argument("--reps", type=int, default=15, help="timed calls per implementation and op (default 15)")
    p.add_argument("--fresh-pages", action="store_true", help="leave glibc's default memory policy")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    if (args.sync or args.fused) and args.device != "cpu":
        p.error("--sync and --fused measure the CPU; they take no --device")
    if args.sync and args.world_size < 2:
        p.error("--world-size: at least 2 processes")
    if args.device == "cuda" and not fastbn.build_info()["cuda_compiled"]:
        p.error("--device cuda: this fastbn was built without CUDA kernels")
    args.impls = args.impls or default_impls(args.device)
    if "floor" not in args.impls:
        args.impls.append("floor")  # every ratio is taken against it
    return args


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _progress(total):
    """Yields a callable advancing a tqdm bar on a terminal; one doing nothing when tqdm is missing
    or output is captured."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        yield lambda: None
        return
    with tqdm(total=total, desc="benchmark", unit="op", leave=False) as bar:
        yield bar.update


def main(argv=None):
    # numpy's OpenBLAS (imported by torch) keeps a thread per core competing for the measured CPUs.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reused = args.device == "cpu" and not args.fresh_pages and keep_freed_memory()
    info = fastbn.build_info()
    meta = {"fastbn": info["version"], "simd": info["simd"], "torch": torch.__version__, "device": args.device,
            "machine": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "preset": args.preset, "reps": args.reps,
            "memory": "reused" if reused else "fresh pages"}
    header = f"fastbn {meta['fastbn']} ({meta['simd']}), torch {meta['torch']}, {args.device} ({meta['machine']}), "
    if args.sync:
        meta.update(preset="sync", threads=1, world_size=args.world_size)
        print(header + f"1 thread per process, SyncBatchNorm over {args.world_size} gloo processes, "
              f"median of {args.reps} steps")
        records = run_distributed_bench(args.world_size, args.reps)
        report = distributed_table(records)
    elif args.fused:
        meta["preset"] = "fused"
        print(header + f"{meta['threads']} threads, fused BatchNorm + (add +) ReLU, training forward + backward, "
              f"float32 NCHW, median of {args.reps}, cold caches")
        with _progress(len(FUSED_SHAPES)) as bar:
            records = run_fused(reps=args.reps, progress=bar)
        memory = run_memory()
        meta["saved_activation_bytes"] = memory
        report = fused_table(records, memory)
    elif args.overhead:
        meta["preset"] = "overhead"
        print(header + f"{meta['threads']} threads, BatchNorm2d (+ ReLU) modules on {tuple(OVERHEAD_SHAPE)}, "
              f"back-to-back calls, median of {args.reps} runs of 200 calls")
        with _progress(len(OVERHEAD_MODULES) * len(OPS)) as bar:
            records = run_overhead(args.device, args.reps, progress=bar)
        report = overhead_table(records)
    elif args.inference:
        meta["preset"] = "inference"
        layouts = args.layout or ["nchw", "nhwc"]
        print(header + f"{meta['threads']} threads, inference of a small ResNet-18, batch 1 and 16, "
              f"median of {args.reps}, cold caches")
        with _progress(2 * len(layouts)) as bar:
            records = run_inference(layouts=layouts, reps=args.reps, device=args.device, progress=bar)
        report = inference_table(records)
    else:
        cases = preset_cases(args.preset, args.layout, args.dtype, args.shape)
        print(header + f"{meta['threads']} threads, preset {args.preset}: {len(cases)} cases x {len(args.ops)} ops, "
              f"median of {args.reps}, cold caches, {meta['memory']}")
        with _progress(len(cases) * len(args.ops)) as bar:
            records = run_cases(cases, args.ops, args.impls, args.reps, args.device, bar)
        report = table(records)
    print(report)
    if args.json:
        write_json(records, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot and (args.sync or args.fused or args.overhead):
        print("--plot: nothing to plot for --sync, --fused or --overhead")
    elif args.plot:
        write_plot(records, args.plot, f"fastbn vs peers, {args.device}, preset {meta['preset']}")
        print(f"wrote {args.plot}")
    return records
