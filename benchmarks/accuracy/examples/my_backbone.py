"""An example of your own vision backbone in the accuracy benchmark (``--tasks-from``): copy and edit.

    python -m benchmarks.accuracy --tasks-from benchmarks/accuracy/examples/my_backbone.py --suite pixel_mlp

``register_backbone(kind, build)`` makes ``VisionModelSpec(kind)`` build your module: it maps images
(B, 3, S, S) in [0, 1] (S = the data's 28 px) to features (B, d) and says d in ``feature_dim``. Its
``nn.Linear`` layers are what the merging methods decompose. Here: a seeded two-layer MLP on the pixels
(load your pretrained weights in ``build`` instead, from an installed file; nothing may be downloaded).
The suite uses built-in tasks with the vision head rule: a linear probe on frozen pretrained features.
"""
import torch
from torch import nn

from benchmarks.accuracy import data, plugins
from benchmarks.accuracy.models import VisionModelSpec
from benchmarks.accuracy.table import RunConfig
from benchmarks.accuracy.zoo import FinetuneHP, SuiteConfig


class PixelMLP(nn.Module):
    """Gray pixels -> hidden features."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.feature_dim = hidden
        self.fc1, self.fc2 = nn.Linear(size * size, hidden), nn.Linear(hidden, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(images.mean(1).flatten(1))))


def build(spec: VisionModelSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PixelMLP(spec.image_size, spec.hidden).eval()


def suite(full: bool) -> tuple[SuiteConfig, RunConfig]:
    cfg = SuiteConfig("vision", ("digits", "mnist"), data.Sizes(train=64, val=32, tta=0, test=64),
                      FinetuneHP(8, 16, 1e-3, head_init="probe"),
                      vision_model=VisionModelSpec("pixel_mlp", image_size=28, hidden=32))
    return cfg, RunConfig(tta_steps=100 if full else 4, track_every=2, plateau_window=4, track_examples=16,
                          awd_steps=3, cart_ranks=(0.08, 1.0))


plugins.register_backbone("pixel_mlp", build)
plugins.register_suite("pixel_mlp", suite)
