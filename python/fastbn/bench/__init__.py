"""fastbn's benchmark: fastbn against torch, torch.compile (inductor), a naive BatchNorm and the
copy floor, side by side in one run. Run it as ``python -m fastbn.bench --help``."""
from .cases import PRESETS, Case, preset_cases
from .runner import run_cases

__all__ = ["PRESETS", "Case", "preset_cases", "run_cases"]
