"""The end-to-end example runs, and BatchNorm by fastbn trains the model as well as torch's."""
import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_resnet.py"


def test_digits_resnet_trains_to_the_same_accuracy():
    pytest.importorskip("sklearn", reason="the example reads scikit-learn's bundled digits")
    spec = importlib.util.spec_from_file_location("digits_resnet", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--epochs", "3", "--width", "16", "--batch", "128"])
    (_, torch_accuracy), (_, fastbn_accuracy) = results["torch BN"], results["fastbn"]
    assert torch_accuracy > 0.8 and fastbn_accuracy > 0.8
    assert abs(torch_accuracy - fastbn_accuracy) <= 0.02
