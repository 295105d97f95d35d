"""The benchmark CLI: its peers compute BatchNorm correctly and its records hold together.
(Timings are never asserted: speed claims come from running the CLI, not from tests.)"""
import json

import pytest
import torch
import torch.nn.functional as F

from fastbn.bench import Case, preset_cases, run_cases
from fastbn.bench.cases import parse_shape
from fastbn.bench.cli import main
from fastbn.bench.distributed import SHAPES as SYNC_SHAPES
from fastbn.bench.fused import SHAPES as FUSED_SHAPES
from fastbn.bench.impls import naive_batch_norm
from fastbn.bench.report import table


@pytest.mark.parametrize("training", [True, False])
def test_naive_peer_is_batch_norm(training):
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    ours = naive_batch_norm(x, rm, rv, w, b, training)
    torch.testing.assert_close(ours, F.batch_norm(x, rm2, rv2, w, b, training))
    torch.testing.assert_close((rm, rv), (rm2, rv2))


def test_run_records_and_table():
    cases = [Case((8, 3, 4, 4), "nhwc"), Case((16, 5))]
    records = run_cases(cases, ops=("train_fwd", "train_fwd_bwd"), impls=("fastbn", "torch", "naive", "floor"),
                        reps=2)
    assert len(records) == 2 * 2 * 4
    for r in records:
        assert {"op", "shape", "layout", "dtype", "impl", "median_ms", "gbps", "floor_ratio"} <= r.keys()
        assert r["median_ms"] > 0 and r["gbps"] > 0
        floor = next(f for f in records if f["impl"] == "floor" and f["op"] == r["op"] and f["label"] == r["label"])
        assert r["floor_ratio"] == pytest.approx(r["median_ms"] / floor["median_ms"])
    text = table(records)
    assert "8x3x4x4 nhwc float32" in text and "16x5 rows float32" in text and "vs best" in text


def test_presets_and_shapes():
    quick = preset_cases("quick")
    assert Case((16, 256, 28, 28), "nhwc") in quick and Case((2048, 768)) in quick
    assert all(c.layout == "nchw" for c in quick if len(c.shape) == 2)  # one layout for 2-D inputs
    resnet = preset_cases("resnet50", dtypes=["bfloat16"])
    assert {c.dtype for c in resnet} == {"bfloat16"} and Case((32, 2048, 7, 7), "nhwc", "bfloat16") in resnet
    assert any(c.threads == 1 for c in preset_cases("full"))
    assert parse_shape("16x256x28x28") == (16, 256, 28, 28)
    with pytest.raises(ValueError, match="2 to 5 positive sizes"):
        parse_shape("16")


def test_cli_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(["--shape", "6x4x5x5", "--shape", "32x7", "--layout", "nchw,nhwc", "--ops", "eval_fwd", "--reps", "2",
          "--impls", "fastbn,torch,inductor", "--json", str(out_json), "--plot", str(out_png)])
    data = json.loads(out_json.read_text())
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"fastbn", "torch", "inductor", "floor"}
    assert len(data["results"]) == 3 * 4  # 6x4x5x5 in two layouts, 32x7 once; 4 implementations
    assert out_png.stat().st_size > 10_000
    assert "6x4x5x5 nhwc float32" in capsys.readouterr().out


def test_cli_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        main(["--ops", "train"])


def test_cli_inference_case(tmp_path, capsys):
    out_json = tmp_path / "inference.json"
    main(["--inference", "--layout", "nhwc", "--reps", "1", "--json", str(out_json)])
    records = json.loads(out_json.read_text())["results"]
    assert {(r["shape"][0], r["impl"]) for r in records} == {(b, v) for b in (1, 16)
                                                            for v in ("torch_bn", "fastbn_bn", "folded")}
    assert all(r["max_rel_diff"] < 1e-5 and r["layout"] == "nhwc" for r in records)
    assert "small ResNet-18 16x3x64x64 nhwc" in capsys.readouterr().out


def test_inference_model_folds_completely():
    from fastbn import fold
    from fastbn.bench.inference import small_resnet
    _, report = fold(small_resnet(), return_report=True)
    assert len(report.folded) == 20 and report.left == []


def test_cli_sync_case(tmp_path, capsys):
    out_json = tmp_path / "sync.json"
    main(["--sync", "--reps", "1", "--json", str(out_json)])
    records = json.loads(out_json.read_text())["results"]
    assert [tuple(r["shape"]) for r in records] == [tuple(s) for s in SYNC_SHAPES]
    for r in records:
        channels = r["channels"]
        # forward: one row of 2C + 2 float32 values; backward: 2C float32 sums
        assert r["bytes_sent"] == {"all_gather_single": 4 * (2 * channels + 2), "all_reduce": 4 * 2 * channels}
        assert r["fastbn_sync_ms"] > 0 and r["torch_local_ms"] > 0
    assert "sync cost" in capsys.readouterr().out


def test_cli_fused_case(tmp_path, capsys):
    out_json = tmp_path / "fused.json"
    main(["--fused", "--reps", "1", "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert [tuple(r["shape"]) for r in data["results"]] == [tuple(s) for s in FUSED_SHAPES]
    assert all(r["fastbn_bn_relu_ms"] > 0 and r["torch_bn_add_relu_ms"] > 0 for r in data["results"])
    memory = data["meta"]["saved_activation_bytes"]
    assert memory["fastbn BatchNormAct2d memory_efficient"] < memory["torch BatchNorm2d + LeakyReLU"]
    assert "autograd-saved activations" in capsys.readouterr().out


def test_cli_overhead_mode(capsys):
    records = main(["--overhead", "--reps", "2"])
    assert {(r["module"], r["op"], r["impl"]) for r in records} == {
        (module, op, impl) for module in ("BatchNorm2d", "BatchNorm2d+ReLU")
        for op in ("train_fwd", "train_fwd_bwd", "eval_fwd") for impl in ("torch", "fastbn")}
    assert all(r["median_ms"] > 0 for r in records)
    assert "fastbn / torch" in capsys.readouterr().out
