"""Properties of the kernels themselves: every SIMD path is correct, results are bit-identical for
any thread count, and the threading honours torch.set_num_threads."""
import threading

import pytest
import torch
import torch.nn.functional as F

import fastbn
from fastbn.functional import batch_norm
from conftest import DTYPE_IDS, DTYPES, assert_close_to_reference, make_input, shape_layouts

ops = torch.ops.fastbn

# One case per kernel path: planes split across threads (C small), planes per channel (C large),
# planes with blocks along the spatial axis, rows (2D and channels_last; 150 channels: blocks
# merged in three ranges of channels, the last partial), many tiny planes.
PATH_SHAPES = [(64, 2, 24, 24), (8, 64, 7, 7), (2, 3, 80, 80), (300, 40), (600, 150), (3, 5, 2, 3, 4), (256, 7, 3)]


def _all_ops(x, w, b, grad):
    out, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
    eval_out = ops.batch_norm_eval(x, w, b, mean, var, 1e-5)
    grads = ops.batch_norm_backward(grad, x, w, mean, var, 1e-5, True, [True, True, True])
    eval_grads = ops.batch_norm_backward(grad, x, w, mean, var, 1e-5, False, [True, True, True])
    return (out, mean, var, eval_out, *grads, *eval_grads)


@pytest.mark.parametrize("shape, layout", shape_layouts(PATH_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simd_paths_against_torch(simd, shape, layout, dtype):
    g = torch.Generator().manual_seed(11)
    x = make_input(shape, dtype, layout, g, scale=3.0, shift=-1.0)
    grad = make_input(shape, dtype, layout, g)
    C = shape[1]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.rand(C, generator=g).to(pdt) + 0.5, torch.randn(C, generator=g).to(pdt)

    def run(fn, x, w, b, grad):
        x, w, b = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b))
        y = fn(x, None, None, w, b, training=True)
        y.backward(grad)
        return y, x.grad, w.grad, b.grad

    ours, theirs = run(batch_norm, x, w, b, grad), run(F.batch_norm, x, w, b, grad)
    ref = run(F.batch_norm, x.double(), w.double(), b.double(), grad.double())
    for name, a, t, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, theirs, ref):
        assert_close_to_reference(a, t, r, dtype, f"{simd} {name}")


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("shape, layout", shape_layouts(PATH_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bit_identical_for_any_thread_count(shape, layout, dtype):
    g = torch.Generator().manual_seed(5)
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=3.0)
    grad = make_input(shape, dtype, layout, g)
    C = shape[1]
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    one = _with_threads(1, lambda: _all_ops(x, w, b, grad))
    for n in (2, 3):
        many = _with_threads(n, lambda: _all_ops(x, w, b, grad))
        for a, m in zip(one, many):
            assert torch.equal(a, m)


def test_honours_set_num_threads_in_new_python_threads():
    # Raw OpenMP regions take their size from torch, so torch.set_num_threads applies in any thread.
    x = torch.randn(64, 8, 32, 32)
    results = {}

    def work():
        torch.set_num_threads(1)
        results["one"] = ops.batch_norm_train(x, None, None, 1e-5)[0]

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert torch.equal(results["one"], ops.batch_norm_train(x, None, None, 1e-5)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_tensor(dtype):
    # 19 MB in fp32, thousands of blocks per reduction: checked against torch in float64 and for
    # bit-identical results on 1 and 2 threads.
    g = torch.Generator().manual_seed(9)
    x = make_input((8, 64, 96, 96), dtype, "contiguous", g, scale=2.0, shift=1.0)
    grad = make_input((8, 64, 96, 96), dtype, "contiguous", g)
    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    one = _with_threads(1, lambda: _all_ops(x, w, b, grad))
    two = _with_threads(2, lambda: _all_ops(x, w, b, grad))
    for a, m in zip(one, two):
        assert torch.equal(a, m)
    out, mean, var, _, grad_input, grad_weight, grad_bias = two[:7]
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    ref = F.batch_norm(xr, None, None, wr, br, training=True)
    ref.backward(grad.double())
    theirs_x = x.clone().requires_grad_()
    theirs = F.batch_norm(theirs_x, None, None, w.clone().requires_grad_(), b.clone().requires_grad_(), training=True)
    theirs.backward(grad)
    assert_close_to_reference(out, theirs, ref, dtype, "output")
    assert_close_to_reference(grad_input, theirs_x.grad, xr.grad, dtype, "grad_input")
    torch.testing.assert_close(grad_bias.double(), br.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad_weight.double(), wr.grad, rtol=1e-4, atol=1e-3)


def _fused_ops(x, w, b, residual, grad):
    """batch_norm_act's training forward and backward: leaky_relu over BN(x) + residual (the
    residual's gradient written by the reduction), and the memory-efficient form (x recovered from
    the output)."""
    results = []
    for memory_efficient in (False, True):
        out, mean, var = ops.batch_norm_act_train(x, w, b, residual, 1e-5, 2, 0.1, memory_efficient)
        saved = out if memory_efficient else x
        results += [out, mean, var, *ops.batch_norm_act_backward(
            grad, saved, memory_efficient, w, b, residual, mean, var, 1e-5, True, 2, 0.1, [True, True, True, True])]
    return results


# Where a group of channels' slices fits in the cache, the CPU planes passes read DRAM once (the
# group is reduced, then normalized from the cache); otherwise they make two passes over memory.
# Both paths must give the same bits, whatever the group size and with a last group cut short.
# 7x7 and 3x3 planes take the groups except on AMD CPUs (build_info's cpu_min_group_plane_bytes).
@pytest.mark.parametrize("shape", [(4, 7, 12, 12), (3, 5, 2, 9, 16), (2, 7, 300), (2, 3, 70, 70), (5, 6, 7, 7),
                                   (9, 4, 3, 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_read_planes_path_gives_the_two_pass_bits(shape, dtype):
    g = torch.Generator().manual_seed(13)
    x, residual, grad = (make_input(shape, dtype, "contiguous", g, scale=2.0, shift=s) for s in (3.0, 0.0, 0.0))
    C = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (torch.rand(C, generator=g) + 0.5).to(pdt), torch.randn(C, generator=g).to(pdt)

    def run():
        return [*_all_ops(x, w, b, grad), *_fused_ops(x, w, b, residual, grad)]

    slice_bytes = x[:, 0].numel() * x.element_size()  # one channel of one tensor
    # A thread's channels in one group; groups of 4 channels in the forward, 2 in the backward (two
    # tensors read), 1 in the fused backward (four); 1 channel in the forward and none after.
    budgets = (1 << 20, 4 * slice_bytes, slice_bytes)
    previous = fastbn._C.set_channel_group_bytes(0)
    try:
        two_passes = run()
        for budget in budgets:
            fastbn._C.set_channel_group_bytes(budget)
            for threads in (1, 2, 3):
                for a, m in zip(two_passes, _with_threads(threads, run)):
                    assert torch.equal(a, m), f"budget {budget}, {threads} threads"
    finally:
        fastbn._C.set_channel_group_bytes(previous)


# Plain BatchNorm writes large outputs with non-temporal stores (AVX2 and AVX-512 tables): whole
# 64-byte lines from registers; float32 and float64 planes of 64 bytes and up as stretches of
# consecutive planes, whose lines may hold the end of one plane and the start of the next; lines
# shared by two rows of 512 bytes and up once both have filled them (float32, float64); 16-bit
# outputs only where every plane or row is whole lines. Planes of 256 values and rows of 64 are
# whole lines in every dtype; 80x64 planes are written in chunks of 4096 values; 14x14, 7x7 and 3x6
# planes, rows of 136 and 3D rows of 200 values share lines.
STREAM_SHAPES = [((3, 5, 16, 16), "contiguous"), ((2, 3, 80, 64), "contiguous"), ((3, 64, 5, 3), "channels_last"),
                 ((2, 64, 2, 3, 2), "channels_last"), ((50, 64), "contiguous"), ((4, 6, 200), "contiguous"),
                 ((3, 5, 14, 14), "contiguous"), ((3, 136, 5, 3), "channels_last"), ((20, 136), "contiguous"),
                 ((3, 5, 7, 7), "contiguous"), ((4, 7, 3, 6), "contiguous")]


@pytest.mark.parametrize("shape, layout", [pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
                                           for s, lay in STREAM_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_streaming_stores_give_the_normal_stores_bits(simd, shape, layout, dtype):
    g = torch.Generator().manual_seed(17)
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=3.0)
    grad = make_input(shape, dtype, layout, g)
    C = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (torch.rand(C, generator=g) + 0.5).to(pdt), torch.randn(C, generator=g).to(pdt)
    total = x.numel() * x.element_size()
    previous = fastbn._C.set_streaming_store_bytes(-1)
    try:
        assert not fastbn._C.streams_output(x.data_ptr(), total)
        normal = _all_ops(x, w, b, grad)
        fastbn._C.set_streaming_store_bytes(total + 1)
        assert not fastbn._C.streams_output(x.data_ptr(), total)
        fastbn._C.set_streaming_store_bytes(0)
        # Outputs are fresh tensors, aligned like x (the allocator aligns to 64 bytes).
        assert fastbn._C.streams_output(x.data_ptr(), total)
        assert not fastbn._C.streams_output(x.data_ptr() + 32, total)
        for budget in (0, fastbn.build_info()["cpu_channel_group_bytes"]):  # two passes, and one read
            previous_budget = fastbn._C.set_channel_group_bytes(budget)
            try:
                for threads in (1, 2, 3):
                    # Freed blocks of the outputs' sizes full of NaN, which the outputs likely reuse:
                    # a value the streaming path failed to write shows instead of a stale copy.
                    poison = [torch.full_like(t, float("nan")) for t in normal if t.is_floating_point()]
                    del poison
                    for a, m in zip(normal, _with_threads(threads, lambda: _all_ops(x, w, b, grad))):
                        assert torch.equal(a, m), f"{threads} threads, group budget {budget}"
            finally:
                fastbn._C.set_channel_group_bytes(previous_budget)
    finally:
        fastbn._C.set_streaming_store_bytes(previous)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_conversions_are_exact_for_every_value(simd, layout, dtype):
    """Every 16-bit pattern through the eval kernel at scale 1 comes back unchanged, and at scales
    (one per channel) that make every product round, equals torch's rounding of the float32 product
    (bit for bit; NaN as NaN): checks the conversions in registers and staged (F16C / AVX2), the
    per-channel parameters' order, and the scalar tails."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).view(1, 16, 64, 64)  # 2^16 values in planes of 4096, or rows of 16
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    zeros, ones = torch.zeros(16), torch.ones(16)
    for scale in (1.0, 1.0 + 2.0**-9 + 2.0**-20):
        weight = scale * (1.0 + torch.arange(16.0) * 2.0**-7) if scale != 1.0 else ones  # distinct per channel
        y = ops.batch_norm_eval(x, weight, zeros, zeros, ones, 0.0)
        expected = (x.float() * weight.view(1, 16, 1, 1) + 0.0).to(dtype)
        assert torch.equal(y.isnan(), expected.isnan())
        same = y.view(torch.int16) == expected.view(torch.int16)
        assert bool((same | expected.isnan()).all()), f"{int((~same & ~expected.isnan()).sum())} values differ"
