"""Merge safetensors (and PyTorch) checkpoint files with the command line and the recipe of ``examples/recipe.yaml``.

Writes a small random-init ViT's "pretrained" and three "fine-tuned" checkpoints into a temporary folder,
copies the recipe beside them, runs ``mergemodules merge`` (layer by layer from memory-mapped files), loads
the output into the original architecture and checks it against the in-Python ``merge(...).fuse()``.
Runs offline in under a minute:

    python examples/cli_merge.py
"""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import mergemodules as mm

RECIPE = Path(__file__).with_name("recipe.yaml")
ARCH = dict(num_classes=10, img_size=32, patch_size=8, depth=2)  # as in recipe.yaml

torch.manual_seed(0)
pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
finetuned = []
for t in range(3):
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    finetuned.append(model)

with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    (folder / "checkpoints").mkdir()
    save_file(pretrained.state_dict(), folder / "checkpoints" / "pretrained.safetensors")
    save_file(finetuned[0].state_dict(), folder / "checkpoints" / "cars.safetensors")
    save_file(finetuned[1].state_dict(), folder / "checkpoints" / "dtd.safetensors")
    torch.save({"state_dict": finetuned[2].state_dict(), "epoch": 10}, folder / "checkpoints" / "svhn.pt")
    shutil.copy(RECIPE, folder / "recipe.yaml")

    command = [sys.executable, "-m", "mergemodules.cli", "merge", str(folder / "recipe.yaml")]
    print("$ mergemodules merge recipe.yaml")
    subprocess.run(command, check=True)  # the same as the `mergemodules` console script

    merged_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    merged_model.load_state_dict(load_file(folder / "merged.safetensors"))  # original keys, original architecture

expected = mm.merge(pretrained, finetuned, "ties", density=0.2, scaling=1.0, exclude=["head"]).fuse()
identical = all(torch.equal(a, b) for a, b in zip(merged_model.state_dict().values(), expected.state_dict().values()))
print("CLI output is bit-identical to merge(...).fuse():", identical)
assert identical
