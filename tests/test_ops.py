"""The registered ops: opcheck, gradcheck in float64, torch.compile(fullgraph=True)."""
import copy

import pytest
import torch
from torch import nn

import fastbn
from fastbn.functional import batch_norm

ops = torch.ops.fastbn


def _inputs(shape, fmt=torch.contiguous_format, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, dtype=dtype, generator=g).contiguous(memory_format=fmt).requires_grad_(requires_grad)
    w = (torch.rand(C, dtype=dtype, generator=g) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(C, dtype=dtype, generator=g).requires_grad_(requires_grad)
    return x, w, b


OPCHECK_CASES = [((4, 3), torch.contiguous_format), ((3, 4, 5), torch.contiguous_format),
                 ((2, 3, 4, 5), torch.channels_last), ((2, 3, 2, 3, 4), torch.contiguous_format)]


@pytest.mark.parametrize("shape, fmt", OPCHECK_CASES, ids=["2d", "3d", "4d-cl", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_every_op(shape, fmt, dtype):
    x, w, b = _inputs(shape, fmt, dtype)
    C = shape[1]
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    torch.library.opcheck(ops.batch_norm_train, (x, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm_train, (x, None, None, 1e-5))
    torch.library.opcheck(ops.batch_norm_eval, (x, w, b, rm, rv, 1e-5))
    _, mean, var = ops.batch_norm_train(x.detach(), w.detach(), b.detach(), 1e-5)
    grad = torch.randn_like(x.detach())
    for training in (True, False):
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(ops.batch_norm_backward,
                                  (grad, x.detach(), w.detach(), mean, var, 1e-5, training, mask))
    nbt = torch.tensor(3)
    torch.library.opcheck(ops.update_running_stats, (rm, rv, nbt, mean, var, 0.1, x.numel() // C))
    torch.library.opcheck(ops.update_running_stats, (rm, rv, nbt, mean, var, None, x.numel() // C))


@pytest.mark.parametrize("shape, fmt", OPCHECK_CASES, ids=["2d", "3d", "4d-cl", "5d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(shape, fmt, training):
    x, w, b = _inputs(shape, fmt)
    C = shape[1]
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    def fn(x, w, b):
        return batch_norm(x, None if training else rm, None if training else rv, w, b, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: batch_norm(x, None, None, training=True), (x,))


class ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU())

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_torch_compile_fullgraph_train_and_eval():
    torch.manual_seed(0)
    eager = fastbn.convert(ConvBNReLU())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)
    assert int(compiled_model.body[1].num_batches_tracked) == 2
    assert not torch.equal(compiled_model.body[1].running_mean, torch.zeros(8))
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contiguous", [True, False], ids=["cpu-loop", "aten-path"])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_update_running_stats_against_hand_computed(contiguous, momentum):
    # Strided running stats take the device-generic ATen path, contiguous ones the CPU loop.
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 1.5, 2.0, 0.25], dtype=torch.float64)
    if contiguous:
        running_mean, running_var = torch.zeros(4), torch.ones(4)
    else:
        running_mean, running_var = torch.zeros(8)[::2], torch.ones(8)[::2]
    counter = torch.tensor(1)
    ops.update_running_stats(running_mean, running_var, counter, mean, var, momentum, 10)
    factor = 0.3 if momentum is not None else 0.5  # cumulative average: 1 / (1 + 1)
    torch.testing.assert_close(running_mean, (factor * mean).float())
    torch.testing.assert_close(running_var, ((1 - factor) + factor * var * 10 / 9).float())
    assert int(counter) == 2


@pytest.mark.parametrize("shape, fmt", OPCHECK_CASES, ids=["2d", "3d", "4d-cl", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_sync_ops(shape, fmt, dtype):
    x, w, _ = _inputs(shape, fmt, dtype, requires_grad=False)
    torch.library.opcheck(ops.batch_norm_stats, (x,))
    mean, var = ops.batch_norm_stats(x)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.batch_norm_backward_elemt, (grad, x, w, mean, var, 1e-5, mean * 0.1, var * 0.2))
    torch.library.opcheck(ops.batch_norm_backward_elemt, (grad, x, None, mean, var, 1e-5, mean * 0.1, var * 0.2))


def test_the_pieces_refuse_to_be_differentiated():
    """The backward and SyncBatchNorm pieces have no derivatives of their own: backpropagating through
    them raises rather than returning wrong grads (grads of grads go through the forward ops)."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    mean, var = ops.batch_norm_stats(x.detach())
    grad = torch.randn_like(x)
    outputs = {
        "batch_norm_stats": ops.batch_norm_stats(x)[0],
        "batch_norm_backward": ops.batch_norm_backward(grad, x, w, mean, var, 1e-5, True, [True, True, True])[0],
        "batch_norm_act_backward": ops.batch_norm_act_backward(grad, x, False, w, None, None, mean, var, 1e-5, True, 1,
                                                               0.0, [True, True, False, False])[0],
        "batch_norm_backward_elemt": ops.batch_norm_backward_elemt(grad, x, w, mean, var, 1e-5, mean, var),
    }
    for name, out in outputs.items():
        with pytest.raises(RuntimeError, match=f"derivative for fastbn::{name} is not implemented"):
            out.sum().backward()
