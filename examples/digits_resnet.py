"""End to end: a small ResNet trained on scikit-learn's bundled digits (1,797 real 8x8 scans, no
download), once with torch's BatchNorm and once after fastbn.convert, from the same initial weights
and the same batches. Prints the median train-step time of each and their test accuracies.

    python examples/digits_resnet.py [--epochs 8] [--batch 128] [--width 64] [--threads N]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastbn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def load_digits(seed):
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from None
    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = (x[order] - 0.5) / 0.5, y[order]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train_side_by_side(models, train_set, test_set, epochs, batch, seed):
    """Trains the models in lockstep (each step of one, then the same step of the other, so that
    machine noise hits both alike) with SGD on the same batches; returns, per model, the median
    step time in ms (the first tenth of the steps is warm-up) and the test accuracy."""
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for name, m in models.items()}
    step_ms = {name: [] for name in models}
    x, y = train_set
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for model in models.values():
            model.train()
        for idx in torch.randperm(len(y), generator=generator).split(batch):
            if len(idx) < 2:  # BatchNorm needs more than one value per channel
                continue
            for name, model in models.items():
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                step_ms[name].append((time.perf_counter() - t0) * 1e3)
    results = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_set[0]).argmax(1) == test_set[1]).float().mean().item()
        times = step_ms[name][len(step_ms[name]) // 10:]
        results[name] = (statistics.median(times), accuracy)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, test_set = load_digits(args.seed)
    torch.manual_seed(args.seed)
    reference = DigitsResNet(args.width)
    converted = fastbn.convert(copy.deepcopy(reference))
    n_bn = sum(isinstance(m, fastbn.BatchNorm2d) for m in converted.modules())
    print(f"digits: {len(train_set[1])} train / {len(test_set[1])} test images, ResNet width {args.width} "
          f"({n_bn} BatchNorm layers), batch {args.batch}, {args.epochs} epochs, {torch.get_num_threads()} threads")
    results = train_side_by_side({"torch BN": reference, "fastbn": converted}, train_set, test_set, args.epochs,
                                 args.batch, args.seed)
    for name, (ms, accuracy) in results.items():
        print(f"{name:>9}: median train step {ms:7.2f} ms, test accuracy {accuracy:.3f}")
    speedup = results["torch BN"][0] / results["fastbn"][0]
    print(f"train step speed-up with fastbn.convert: {speedup:.2f}x")
    return results


if __name__ == "__main__":
    main()
