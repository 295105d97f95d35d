"""What to measure: cases (shape, memory layout, dtype) and the presets that group them."""
from dataclasses import dataclass

import torch

OPS = ("train_fwd", "train_fwd_bwd", "eval_fwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str = "nchw"  # nchw (contiguous) or nhwc (channels_last / channels_last_3d)
    dtype: str = "float32"
    threads: int = 0  # 0: torch's current setting

    @property
    def label(self):
        dims = "x".join(map(str, self.shape))
        layout = self.layout if len(self.shape) in (4, 5) else "rows"
        return f"{dims} {layout} {self.dtype}" + (f" t{self.threads}" if self.threads else "")

    def memory_format(self):
        if self.layout != "nhwc" or len(self.shape) not in (4, 5):
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d


# Every BatchNorm input of torchvision's ResNet-50 at 224x224 (channels, spatial size).
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
               (1024, 14), (512, 14), (512, 7), (2048, 7)]


def _resnet50(batch):
    return [(batch, c, s, s) for c, s in RESNET50_BN]


PRESETS = {
    "quick": {
        "shapes": [(16, 256, 28, 28), (24, 512, 14, 14), (2048, 768)],
        "layouts": ["nchw", "nhwc"],
        "dtypes": ["float32"],
    },
    "resnet50": {
        "shapes": _resnet50(16) + _resnet50(32) + [(2048, 768), (8, 64, 16, 28, 28)],
        "layouts": ["nchw", "nhwc"],
        "dtypes": ["float32", "bfloat16"],
    },
    "full": {
        "shapes": _resnet50(16) + _resnet50(32) + [(2048, 768), (8, 64, 16, 28, 28)],
        "layouts": ["nchw", "nhwc"],
        "dtypes": ["float32", "bfloat16", "float16"],
        "thread_scaling": [(16, 256, 28, 28), (2048, 768)],
    },
}


def preset_cases(name, layouts=None, dtypes=None, shapes=None):
    """The cases of a preset, optionally with other layouts, dtypes or shapes. 2-D and 3-D inputs
    have a single layout and are listed once; the full preset adds 1-vs-N thread scaling."""
    preset = PRESETS[name]
    layouts = layouts or preset["layouts"]
    cases = []
    for dtype in dtypes or preset["dtypes"]:
        for shape in shapes or preset["shapes"]:
            for layout in layouts if len(shape) in (4, 5) else ["nchw"]:
                cases.append(Case(tuple(shape), layout, dtype))
    for shape in [] if shapes else preset.get("thread_scaling", []):
        for threads in sorted({1, torch.get_num_threads()}):
            cases.append(Case(tuple(shape), "nchw", "float32", threads))
    return cases


def parse_shape(text):
    """'16x256x28x28' -> (16, 256, 28, 28); rank 2 to 5."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise ValueError(f"a shape is 2 to 5 positive sizes joined by 'x' (like 16x256x28x28), not {text!r}")
    return shape
