"""fastbn.SyncBatchNorm across spawned processes (gloo over loopback): outputs, grads and running
statistics equal one torch BatchNorm over the concatenated batch, in float64 to 1e-9."""
import datetime
import json
import multiprocessing
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastbn

TOL64 = 1e-9

# name: (per-rank batch sizes for world sizes 2 and 3, per-sample shape, layout, dtype, module options, input scale)
CASES = {
    "nchw-uneven": ({2: [3, 5], 3: [2, 6, 3]}, (4, 5, 6), "contiguous", torch.float64, {}, 3.0),
    "channels_last": ({2: [4, 2], 3: [1, 3, 2]}, (3, 4, 5), "channels_last", torch.float64, {}, 3.0),
    "empty-rank": ({2: [0, 6], 3: [3, 0, 4]}, (5, 3, 3), "contiguous", torch.float64, {}, 3.0),
    "rows-one-sample-each": ({2: [1, 1], 3: [1, 1, 1]}, (7,), "contiguous", torch.float64, {}, 3.0),
    "bn1d-3d-input": ({2: [2, 3], 3: [2, 1, 2]}, (6, 9), "contiguous", torch.float64, {}, 3.0),
    "bn3d-channels_last": ({2: [2, 1], 3: [1, 1, 2]}, (3, 2, 3, 4), "channels_last", torch.float64, {}, 3.0),
    "no-affine-cumulative": ({2: [3, 2], 3: [2, 2, 2]}, (4, 3, 3), "contiguous", torch.float64,
                             {"affine": False, "momentum": None}, 3.0),
    "no-running-stats": ({2: [2, 3], 3: [1, 2, 3]}, (4, 3, 3), "contiguous", torch.float64,
                         {"track_running_stats": False}, 3.0),
    # variance 1e-12, far below eps: the statistics must not pass through invstd (torch's SyncBatchNorm
    # does, and its running_var loses the digits eps swamps)
    "variance-below-eps": ({2: [3, 4], 3: [2, 3, 2]}, (3, 4), "contiguous", torch.float64, {"momentum": 1.0}, 1e-6),
    "float32": ({2: [5, 3], 3: [3, 3, 2]}, (8, 7, 7), "channels_last", torch.float32, {}, 3.0),
}


# ---- running functions on spawned processes -----------------------------------------------------

def _worker(rank, world_size, init_file, fn_name, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        payload = {"result": globals()[fn_name](rank, world_size)}
    except Exception:
        payload = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    with open(result_file, "w") as f:
        json.dump(payload, f)


def run_distributed(fn, world_size, tmp_path, timeout=180):
    """Runs fn(rank, world_size) on `world_size` spawned processes joined by gloo; returns the
    results in rank order, or fails with the first process's traceback."""
    ctx = multiprocessing.get_context("spawn")
    files = [tmp_path / f"rank{r}.json" for r in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(r, world_size, str(tmp_path / "init"), fn.__name__, str(files[r])))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish in {timeout} s"
    payloads = [json.loads(f.read_text()) if f.exists() else {"error": f"rank {r} died"} for r, f in enumerate(files)]
    errors = [p["error"] for p in payloads if "error" in p]
    assert not errors, errors[0]
    return [p["result"] for p in payloads]


# ---- what each process runs -----------------------------------------------------------------------

def _layout(x, layout):
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _torch_bn(channels, rank, **options):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](channels, **options)


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare_with_full_batch(rank, world_size):
    """Every case, two training steps: this process's slice through fastbn.SyncBatchNorm against the
    full batch through torch's BatchNorm in float64. Returns the largest difference per case."""
    errors = {}
    for name, (sizes, sample, layout, dtype, options, scale) in CASES.items():
        sizes = sizes[world_size]
        start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        channels = sample[0]
        ref = _torch_bn(channels, len(sample) + 1, dtype=torch.float64, **options)
        ours = fastbn.SyncBatchNorm(channels, dtype=torch.float32 if dtype != torch.float64 else dtype, **options)
        if ref.affine:
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                ref.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
                ref.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
                ours.weight.copy_(ref.weight)
                ours.bias.copy_(ref.bias)
        worst = 0.0
        for step in range(2):
            g = torch.Generator().manual_seed(100 * step + len(name))
            x = torch.randn((sum(sizes), *sample), generator=g, dtype=torch.float64) * scale + 1
            dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x_full = x.clone().requires_grad_()
            ref.zero_grad()
            ref(x_full).backward(dy)
            x_local = _layout(x[start:stop].to(dtype), layout).requires_grad_()
            ours.zero_grad()
            y = ours(x_local)
            assert y.stride() == x_local.stride()  # channels_last kept
            y.backward(_layout(dy[start:stop].to(dtype), layout))
            worst = max(worst, _max_diff(y, _reference_output(ref, x, options)[start:stop]),
                        _max_diff(x_local.grad, x_full.grad[start:stop]))
            if ref.affine:  # parameter grads are local; their sum over processes is the full batch's
                grads = torch.cat([ours.weight.grad, ours.bias.grad]).double()
                dist.all_reduce(grads)
                worst = max(worst, _max_diff(grads, torch.cat([ref.weight.grad, ref.bias.grad])))
            if ref.track_running_stats:
                # relative for the variance, which can be tiny
                worst = max(worst, _max_diff(ours.running_mean, ref.running_mean),
                            _max_diff(ours.running_var / ref.running_var, torch.ones_like(ref.running_var)))
                assert int(ours.num_batches_tracked) == step + 1
        errors[name] = worst
    return errors


def _reference_output(ref, x, options):
    """torch's training output for x, computed without touching ref's running statistics again."""
    return torch.nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)


def global_batch_of_one(rank, world_size):
    """One sample in all, on rank 0: torch's error, and running statistics untouched."""
    bn = fastbn.SyncBatchNorm(3)
    x = torch.randn(1 if rank == 0 else 0, 3)
    try:
        bn(x)
    except ValueError as e:
        message = str(e)
    else:
        message = None
    return {"message": message, "untouched": bool(torch.equal(bn.running_mean, torch.zeros(3))
                                                  and torch.equal(bn.running_var, torch.ones(3))
                                                  and int(bn.num_batches_tracked) == 0)}


def grads_of_grads(rank, world_size):
    """create_graph=True: the first grads come, differentiating them again raises (not silently wrong)."""
    bn = fastbn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    (grad,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as e:
        return str(e)
    return None


def process_group_honored(rank, world_size):
    """Ranks 0 and 1 synchronize in their own group; rank 2 is in no group and trains alone."""
    group = dist.new_group([0, 1])
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mine = {0: x[:3], 1: x[3:5], 2: x[5:]}[rank]
    bn = fastbn.SyncBatchNorm(4, dtype=torch.float64, process_group=group if rank < 2 else None)
    if rank == 2:  # not in the group: a local BatchNorm (world of its own would be WORLD, so leave it out)
        bn = fastbn.BatchNorm2d(4, dtype=torch.float64)
    y = bn(mine)
    expected = torch.nn.functional.batch_norm(x[:5] if rank < 2 else x[5:], None, None, training=True)
    return _max_diff(y, expected[{0: slice(0, 3), 1: slice(3, 5), 2: slice(0, 3)}[rank]])


def _ddp_model(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double()


def ddp_training(rank, world_size):
    """Three SGD steps of DistributedDataParallel with fastbn.SyncBatchNorm on uneven slices, against
    single-process training of the same model with torch's BatchNorm on the full batch."""
    sizes = [3, 5]
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    # DDP's constructor refuses CPU modules holding any nn.SyncBatchNorm (it assumes torch's, which is
    # GPU-only); the BatchNorms are converted once it is built, sharing the Parameters DDP holds.
    model = torch.nn.parallel.DistributedDataParallel(_ddp_model(nn.BatchNorm2d))
    fastbn.SyncBatchNorm.convert_sync_batchnorm(model.module)
    assert isinstance(model.module[1], fastbn.SyncBatchNorm)
    reference = _ddp_model(nn.BatchNorm2d)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    total = sum(sizes)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(total, 3, 6, 6, generator=g, dtype=torch.float64)
        target = torch.randn(total, 2, generator=g, dtype=torch.float64)
        # DDP averages gradients over processes: scale each local sum so the average is the full mean.
        loss = ((model(x[start:stop]) - target[start:stop]) ** 2).sum() * world_size / total
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = ((reference(x) - target) ** 2).sum() / total
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    ours = model.module.state_dict()
    return max(_max_diff(ours[k], v) for k, v in reference.state_dict().items())


# ---- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_one_batch_norm_over_the_full_batch(world_size, tmp_path):
    for rank, errors in enumerate(run_distributed(compare_with_full_batch, world_size, tmp_path)):
        for name, error in errors.items():
            tol = TOL64 if CASES[name][3] == torch.float64 else 1e-4
            assert error <= tol, f"rank {rank}, case {name}: largest difference {error:.3e}"


def test_global_batch_of_one_is_an_error(tmp_path):
    for result in run_distributed(global_batch_of_one, 2, tmp_path):
        assert result["message"] and "Expected more than 1 value per channel when training, got 1" in result["message"]
        assert result["untouched"]


def test_grads_of_grads_raise(tmp_path):
    for message in run_distributed(grads_of_grads, 2, tmp_path):
        assert message and "once_differentiable" in message


def test_process_group_is_honored(tmp_path):
    assert max(run_distributed(process_group_honored, 3, tmp_path)) <= TOL64


def test_ddp_training_matches_single_process(tmp_path):
    assert max(run_distributed(ddp_training, 2, tmp_path)) <= TOL64


# ---- single process: no communication ------------------------------------------------------------

def test_without_process_group_is_plain_batch_norm():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sync, ref = fastbn.SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=TOL64)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=0, atol=TOL64)
    sync.eval(), ref.eval()
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=TOL64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync.train()(torch.randn(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(3))


def test_state_dicts_interchange_with_torch():
    theirs = nn.SyncBatchNorm(5)
    with torch.no_grad():
        theirs.running_mean.normal_()
        theirs.weight.normal_()
    ours = fastbn.SyncBatchNorm(5)
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert isinstance(ours, nn.SyncBatchNorm)


def test_convert_sync_batchnorm_shares_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), fastbn.BatchNorm1d(4), nn.SyncBatchNorm(4).eval())
    weight = model[1].weight
    converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert [type(m) for m in converted] == [nn.Conv2d] + [fastbn.SyncBatchNorm] * 3
    assert converted[1].weight is weight and converted[1].process_group == "group"
    assert not converted[3].training and converted[1].training
    swapped = fastbn.convert(nn.Sequential(nn.SyncBatchNorm(4, process_group="g")))
    assert type(swapped[0]) is fastbn.SyncBatchNorm and swapped[0].process_group == "g"

