"""The CUDA kernels against torch in float64 on the CPU: every op, dtype, layout and rank, odd sizes,
the fused epilogues, running statistics, SyncBatchNorm's pieces, opcheck, gradcheck, torch.compile,
64-bit indexing and bad input. Each test starts with the caching allocator's free memory poisoned
with NaN, so an output element a kernel fails to write shows up. Skipped without a CUDA device."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from fastbn.functional import batch_norm, batch_norm_act
from conftest import (DTYPE_IDS, DTYPES, SHAPES, assert_backward_gives_exactly_the_grads_asked_for,
                      assert_close_to_reference, input_grad_scale, make_input, param_dtype_for, shape_id, stable_seed)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# Beyond conftest's shapes: sizes where the kernels take 16-byte packs (planes a multiple of 8 values,
# channels a multiple of 8) or 8-byte packs of 16-bit values (planes or channels a multiple of 4 only),
# channels split over many blocks (C far below the SM count), and ResNet layers.
CUDA_SHAPES = SHAPES + [(64, 32), (4096, 24), (4, 16, 8, 8), (3, 8, 5, 5), (2, 2, 256, 256), (16, 64, 56, 56),
                        (32, 2048, 7, 7), (2, 8, 4, 8, 8), (2, 12, 14, 14), (96, 12)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def cases(shapes=CUDA_SHAPES):
    return [pytest.param(s, layout, id=f"{shape_id(s)}-{layout}") for s in shapes for layout in LAYOUTS
            if layout != "channels_last" or len(s) in (4, 5)]


@pytest.fixture(autouse=True)
def poisoned_allocator():
    """Fills free cached memory, large pool and small pool, with 0xFF bytes (NaN in every float type)."""
    if not fastbn.build_info()["cuda_compiled"]:
        pytest.fail("a CUDA device is present but this fastbn was built without CUDA kernels")
    torch.cuda.empty_cache()
    blocks = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda")]
    blocks += [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(64)]
    for b in blocks:
        b.fill_(0xFF)
    del blocks
    yield
    torch.cuda.synchronize()  # a kernel fault surfaces in its own test


def _force_persistent_kernels(monkeypatch, forced):
    """FASTBN_CUDA_PERSISTENT (read on every call): 1, the persistent kernels take the training passes
    of every tensor that fits on chip; 0, never (unset, fastbn chooses by shape)."""
    monkeypatch.setenv("FASTBN_CUDA_PERSISTENT", "1" if forced else "0")


@pytest.fixture(params=["two-pass", "persistent"])
def kernel_path(request, monkeypatch):
    """Runs a test on the two-pass kernels and again on the persistent ones, wherever they fit."""
    _force_persistent_kernels(monkeypatch, request.param == "persistent")
    return request.param


def _leaf(t):
    return None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_()


def _params(C, dtype, g):
    pdt = param_dtype_for(dtype)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(pdt)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(pdt)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    return weight, bias, running_mean, running_var


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _like_on_cuda(t):
    """t on the GPU in the same layout: a dense tensor keeps its strides through .to(); a strided
    view becomes the same view of a wider GPU tensor."""
    if t is None:
        return None
    moved = t.to("cuda")
    if moved.stride() == t.stride():
        return moved
    wide = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device="cuda")
    view = wide[..., ::2]
    view.copy_(t)
    return view


@pytest.mark.parametrize("shape, layout", cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_against_float64(shape, layout, dtype, training, kernel_path):
    g = torch.Generator().manual_seed(stable_seed("cuda", shape, layout, str(dtype), training))
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    grad = make_input(shape, dtype, layout, g)
    weight, bias, rm, rv = _params(shape[1], dtype, g)

    def run(fn, x, weight, bias, rm, rv, grad):
        x, weight, bias = _leaf(x), _leaf(weight), _leaf(bias)
        rm, rv = rm.clone(), rv.clone()
        y = fn(x, rm, rv, weight, bias, training=training, momentum=0.1, eps=1e-5)
        y.backward(grad)
        return [t.cpu() for t in (y, x.grad, weight.grad, bias.grad, rm, rv)], y, x.grad

    xd = _like_on_cuda(x)
    ours, y, dx = run(batch_norm, xd, *to("cuda", weight, bias, rm, rv), _like_on_cuda(grad))
    theirs, _, _ = run(F.batch_norm, xd, *to("cuda", weight, bias, rm, rv), _like_on_cuda(grad))
    ref, _, _ = run(F.batch_norm, x.double(), *[t.double() for t in (weight, bias, rm, rv)], grad.double())
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, a, t, r in zip(names, ours, theirs, ref):
        assert a.dtype == t.dtype, name
        assert not a.isnan().any(), f"{name}: NaN (an element the kernels did not write?)"
        scale = input_grad_scale(x, weight, grad) if name == "grad_input" and training else None
        assert_close_to_reference(a, t, r, dtype, name, scale)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


ACTIVATIONS = {
    "identity": (None, lambda z, p: z),
    "relu": (None, lambda z, p: F.relu(z)),
    "leaky_relu": (0.2, lambda z, p: F.leaky_relu(z, p)),
    "elu": (0.7, lambda z, p: F.elu(z, p)),
    "silu": (None, lambda z, p: F.silu(z)),
}
MODES = [pytest.param(a, me, id=f"{a}-{'memory-efficient' if me else 'standard'}")
         for a in ACTIVATIONS for me in (False, True) if not me or a in ("identity", "leaky_relu")]


@pytest.mark.parametrize("shape, layout", cases([(7, 3), (64, 32), (4, 3, 5, 5), (4, 16, 8, 8), (2, 3, 2, 3, 5)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation, memory_efficient", MODES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_activation_against_float64(shape, layout, dtype, activation, memory_efficient, with_residual,
                                          training, kernel_path):
    g = torch.Generator().manual_seed(stable_seed("cuda-act", shape, layout, str(dtype)))
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    residual = make_input(shape, dtype, layout, g) if with_residual else None
    grad = make_input(shape, dtype, layout, g)
    weight, bias, rm, rv = _params(shape[1], dtype, g)
    param = ACTIVATIONS[activation][0]

    def composite(x, rm, rv, weight, bias, residual):
        z = F.batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5)
        return ACTIVATIONS[activation][1](z if residual is None else z + residual, param)

    def fused(x, rm, rv, weight, bias, residual):
        return batch_norm_act(x, rm, rv, weight, bias, training, 0.1, 1e-5, activation=activation,
                              activation_param=param, residual=residual, memory_efficient=memory_efficient)

    def run(fn, x, weight, bias, residual, rm, rv, grad):
        x, weight, bias, residual = _leaf(x), _leaf(weight), _leaf(bias), _leaf(residual)
        rm, rv = rm.clone(), rv.clone()
        y = fn(x, rm, rv, weight, bias, residual)
        y.backward(grad)
        out = [y, x.grad, weight.grad, bias.grad, residual.grad if residual is not None else None, rm, rv]
        return [None if t is None else t.cpu() for t in out]

    on_cuda = [_like_on_cuda(x), *to("cuda", weight, bias), _like_on_cuda(residual), *to("cuda", rm, rv),
               _like_on_cuda(grad)]
    ours = run(fused, *on_cuda)
    theirs = run(composite, *on_cuda)
    ref = run(composite, *[None if t is None else t.double() for t in (x, weight, bias, residual, rm, rv, grad)])
    names = ["output", "grad_input", "grad_weight", "grad_bias", "grad_residual", "running_mean", "running_var"]
    for name, a, t, r in zip(names, ours, theirs, ref):
        if r is None:
            assert a is None, name
            continue
        assert not a.isnan().any(), f"{name}: NaN"
        scale = input_grad_scale(x, weight, grad) if name == "grad_input" and training else None
        assert_close_to_reference(a, t, r, dtype, name, scale)


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_module_running_statistics_over_steps(stat_dtype, momentum):
    """fastbn.BatchNorm2d on the GPU against torch's on the CPU in float64, over four training steps."""
    torch.manual_seed(3)
    ours = fastbn.BatchNorm2d(24, momentum=momentum).to("cuda", stat_dtype)
    ref = nn.BatchNorm2d(24, momentum=momentum).double()
    for step in range(4):
        x = torch.randn(8, 24, 6, 6, dtype=torch.float64) * (1 + step) + step
        ours(x.to("cuda", stat_dtype))
        ref(x)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}[stat_dtype]
    torch.testing.assert_close(ours.running_mean.cpu().double(), ref.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.cpu().double(), ref.running_var, rtol=tol, atol=tol)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("shape, layout", cases([(64, 32), (4, 16, 8, 8), (3, 5, 7)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sync_batch_norm_pieces_equal_cpu(shape, layout, dtype):
    """batch_norm_stats and batch_norm_backward_elemt (SyncBatchNorm's ops) on the GPU and the CPU agree."""
    g = torch.Generator().manual_seed(stable_seed("cuda-sync", shape, layout, str(dtype)))
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    dy = make_input(shape, dtype, layout, g)
    weight, _, _, _ = _params(shape[1], dtype, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean_dy = torch.randn(shape[1], generator=g, dtype=torch.float64).to(acc)
    mean_dy_xhat = torch.randn(shape[1], generator=g, dtype=torch.float64).to(acc)
    ops = torch.ops.fastbn
    mean, var = ops.batch_norm_stats(_like_on_cuda(x))
    ref_mean, ref_var = ops.batch_norm_stats(x.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=tol, atol=tol)
    dx = ops.batch_norm_backward_elemt(_like_on_cuda(dy), _like_on_cuda(x), weight.cuda(), mean, var, 1e-5,
                                       mean_dy.cuda(), mean_dy_xhat.cuda())
    ref = ops.batch_norm_backward_elemt(dy.double(), x.double(), weight.double(), mean.cpu().double(),
                                        var.cpu().double(), 1e-5, mean_dy.double(), mean_dy_xhat.double())
    scale = max(1.0, ref.abs().max().item())
    ulps = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert (dx.cpu().double() - ref).abs().max().item() <= ulps * scale


def _op_samples(device, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 4, 3, generator=g, dtype=dtype).to(device)
    w, b = (torch.rand(5, dtype=dtype) + 0.5).to(device), torch.randn(5, dtype=dtype).to(device)
    rm, rv = torch.randn(5, dtype=dtype).to(device), (torch.rand(5, dtype=dtype) + 0.5).to(device)
    return x, w, b, rm, rv


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_every_op(layout):
    x, w, b, rm, rv = _op_samples("cuda", torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.fastbn.batch_norm_stats(x)
    dy, r = torch.randn_like(x), torch.randn_like(x)
    nbt = torch.zeros((), dtype=torch.long, device="cuda")
    ops = torch.ops.fastbn
    samples = [
        (ops.batch_norm_train, (x, w, b, 1e-5)),
        (ops.batch_norm_eval, (x, w, b, rm, rv, 1e-5)),
        (ops.batch_norm_backward, (dy, x, w, mean, var, 1e-5, True, [True, True, True])),
        (ops.batch_norm_backward, (dy, x, None, rm, rv, 1e-5, False, [True, False, True])),
        (ops.batch_norm_act_train, (x, w, b, r, 1e-5, 2, 0.1, False)),
        (ops.batch_norm_act_eval, (x, w, b, r, rm, rv, 1e-5, 3, 1.0, False)),
        (ops.batch_norm_act_backward, (dy, x, False, w, b, r, mean, var, 1e-5, True, 4, 0.0,
                                       [True, True, True, True])),
        (ops.batch_norm_stats, (x,)),
        (ops.batch_norm_backward_elemt, (dy, x, w, mean, var, 1e-5, mean.clone(), var.clone())),
        (ops.update_running_stats, (rm.clone(), rv.clone(), nbt, mean, var, 0.1, x.numel() // 5)),
        (ops.update_running_stats, (rm.clone(), rv.clone(), nbt.clone(), mean, var, None, x.numel() // 5)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(training, layout):
    x, w, b, rm, rv = _op_samples("cuda", torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.detach().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, rm.clone(), rv.clone(), w, b, training=training), inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fastbn.BatchNorm2d(8), nn.ReLU()).cuda().train(training)
    twin = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fastbn.BatchNorm2d(8), nn.ReLU()).cuda().train(training)
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 10, 10, device="cuda")
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin[1].running_mean, net[1].running_mean)
    torch.testing.assert_close(twin[1].running_var, net[1].running_var)


def test_beyond_two_to_the_31_elements():
    """64-bit indexing: 2^31 + 2^20 bfloat16 values over 2 channels, NCHW and channels_last."""
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs 40 GB of device memory")
    spatial = (1 << 30) + (1 << 19)
    x = torch.empty(1, 2, spatial, 1, dtype=torch.bfloat16, device="cuda")
    x[:, 0].normal_(3.0, 2.0)
    x[:, 1].normal_(-1.0, 0.5)
    for layout in ("contiguous", "channels_last"):
        xl = x if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)
        y, mean, var = torch.ops.fastbn.batch_norm_train(xl, None, None, 1e-5)
        for c in range(2):
            xc = x[0, c].float()
            ref_var, ref_mean = torch.var_mean(xc, unbiased=False)
            torch.testing.assert_close(mean[c], ref_mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(var[c], ref_var, rtol=1e-4, atol=1e-4)
            # the tail of the tensor, past 2^31 elements, is normalized too
            tail = y[0, c, -4096:].float()
            expected = (xc[-4096:] - ref_mean) * torch.rsqrt(ref_var + 1e-5)
            torch.testing.assert_close(tail, expected, rtol=2e-2, atol=2e-2)
        del y
    torch.cuda.empty_cache()


def test_device_mismatches_are_refused():
    x = torch.randn(4, 3, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        batch_norm(x, None, None, torch.ones(3), None, training=True)
    mean, var = torch.ops.fastbn.batch_norm_stats(x)
    with pytest.raises(RuntimeError, match="grad_output is on cpu but input is on cuda"):
        torch.ops.fastbn.batch_norm_backward(torch.randn(4, 3, 5, 5), x, None, mean, var, 1e-5, True,
                                             [True, False, False])
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):  # as torch
        batch_norm(torch.randn(1, 3, device="cuda"), rm, rv, training=True)
    torch.testing.assert_close(rm, torch.zeros(3, device="cuda"))  # a failed call leaves them alone


def test_runs_on_the_current_stream_and_device():
    """Work is queued on the caller's stream: on a side stream, results are ready after that stream syncs."""
    x = torch.randn(16, 32, 20, 20, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = batch_norm(x, None, None, training=True)
    side.synchronize()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", range(1, 16), ids=lambda m: f"mask{m:04b}")
@pytest.mark.parametrize("shape, layout", [((4, 6, 5, 5), "contiguous"), ((16, 4, 32, 32), "contiguous"),
                                           ((4, 6, 5, 5), "channels_last"), ((40, 6), "contiguous")],
                         ids=["nchw-one-block-per-channel", "nchw-split", "nhwc", "rows"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_backward_returns_exactly_the_grads_asked_for(mask, shape, layout, with_residual, kernel_path):
    """Every subset of (input, weight, bias, residual) grads equals the same grads computed all at
    once, on each of the backward's launch plans: one fused launch where a block holds a channel,
    reduce / finish / apply where channels are split, the rows kernels, and the persistent kernel."""
    g = torch.Generator().manual_seed(stable_seed("mask", mask, shape, layout))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def tensor(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).cuda()

    x, dy = (tensor(*shape).contiguous(memory_format=fmt) for _ in range(2))
    residual = tensor(*shape).contiguous(memory_format=fmt) if with_residual else None
    weight, bias = tensor(shape[1]) + 1.5, tensor(shape[1])
    assert_backward_gives_exactly_the_grads_asked_for(x, dy, weight, bias, residual, mask)


def _kernels_run(fn):
    """The names of the CUDA kernels fn() launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _persistent_kernels_of_a_training_step(shape, layout, dtype):
    """The persistent forward and backward kernels, and the two-pass ones (reductions, finishing,
    one-launch planes), that one training step (forward and backward) runs."""
    g = torch.Generator().manual_seed(stable_seed("persistent", shape, layout, str(dtype)))
    x = _leaf(_like_on_cuda(make_input(shape, dtype, layout, g)))
    weight, bias, _, _ = to("cuda", *_params(shape[1], dtype, g))
    grad = _like_on_cuda(make_input(shape, dtype, layout, g))

    def step():
        batch_norm(x, None, None, weight, bias, training=True).backward(grad)

    names = _kernels_run(step)
    forward = [n for n in names if "persistent_train_forward_kernel" in n]
    backward = [n for n in names if "persistent_backward_kernel" in n]
    two_pass = [n for n in names if "reduce_" in n or "finish_kernel" in n or "_planes_kernel" in n]
    return forward, backward, two_pass


@pytest.mark.parametrize("shape, layout", cases([(64, 32), (7, 3), (4, 16, 8, 8), (3, 8, 5, 5), (2, 8, 4, 8, 8),
                                                 (2, 12, 14, 14)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("forced", [False, True], ids=["FASTBN_CUDA_PERSISTENT=0", "FASTBN_CUDA_PERSISTENT=1"])
def test_persistent_switch_forces_either_path(shape, layout, dtype, forced, monkeypatch):
    """Forced on, a small training step is one cooperative launch each way (the kernels the other
    tests check against float64 are then really the persistent ones); forced off, none runs."""
    _force_persistent_kernels(monkeypatch, forced)
    forward, backward, two_pass = _persistent_kernels_of_a_training_step(shape, layout, dtype)
    if forced:
        assert len(forward) == 1 and len(backward) == 1 and not two_pass, (forward, backward, two_pass)
    else:
        assert not forward and not backward and two_pass, (forward, backward, two_pass)


@pytest.mark.parametrize("shape, layout, forward, backward", [
    ((8, 16, 32, 32), "channels_last", True, True),     # rows: <= 512 channels, >= 8192 rows
    ((8192, 16), "contiguous", True, True),
    ((4096, 16), "contiguous", False, False),           # too few rows
    ((16, 1024, 7, 7), "channels_last", False, False),  # too many channels
    ((32, 16, 28, 28), "contiguous", True, False),      # planes: <= 128 channels of >= 25088 values
    ((8, 16, 28, 28), "contiguous", False, False),
    ((32, 256, 28, 28), "contiguous", False, False),
])
def test_persistent_kernels_by_default_where_measured_faster(shape, layout, forward, backward, monkeypatch):
    """Unset, the switch leaves the choice to the shape rule that the H200 measurements gave (see
    persistent_wanted in csrc/cuda/batch_norm_kernels.cu): the forward and the backward each."""
    monkeypatch.delenv("FASTBN_CUDA_PERSISTENT", raising=False)
    persistent_forward, persistent_backward, _ = _persistent_kernels_of_a_training_step(shape, layout, torch.float32)
    assert (len(persistent_forward), len(persistent_backward)) == (int(forward), int(backward))
