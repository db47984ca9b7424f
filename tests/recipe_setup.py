"""Checkpoint files and recipes on disk for the CLI, recipe and sources tests (small random-init models)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from helpers import perturbed

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_KWARGS = {"num_classes": 5, "img_size": 32, "patch_size": 8, "depth": 1}
HERE = Path(__file__).parent


def timm_model() -> nn.Module:
    """The small timm ViT the recipes name."""
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, **TIMM_KWARGS)


def write_timm_checkpoints(
    folder: Path, tasks: int = 3, suffix: str = ".safetensors"
) -> tuple[nn.Module, list[nn.Module]]:
    """base.safetensors and task{i}{suffix} (safetensors or torch.save) of a small timm ViT; returns the models."""
    torch.manual_seed(0)
    base = timm_model()
    finetuned = [perturbed(base, seed=i + 1, rank=2) for i in range(tasks)]
    save_file(base.state_dict(), folder / "base.safetensors")
    for i, model in enumerate(finetuned):
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if suffix == ".safetensors":
            save_file(state, folder / f"task{i}.safetensors")
        else:
            torch.save({"state_dict": state, "epoch": 3}, folder / f"task{i}{suffix}")
    return base, finetuned


def timm_recipe(folder: Path, tasks: int = 3, suffix: str = ".safetensors", **overrides: Any) -> dict[str, Any]:
    """The recipe (as a dict) merging the checkpoints of :func:`write_timm_checkpoints`."""
    task_specs: list[Any] = [f"task{i}.safetensors" for i in range(tasks)]
    if suffix != ".safetensors":
        task_specs = [{"path": f"task{i}{suffix}", "key": "state_dict"} for i in range(tasks)]
    recipe = {
        "model": {"timm": TIMM_NAME, "kwargs": dict(TIMM_KWARGS)},
        "base": "base.safetensors",
        "tasks": task_specs,
        "method": "task_arithmetic",
        "options": {"scaling": 0.4},
        "exclude": ["head"],
        "output": "merged.safetensors",
    }
    recipe.update(overrides)
    return recipe


def write_recipe(folder: Path, recipe: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    """Write a recipe dict (or raw YAML text) to ``folder/name``."""
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def gpt2_folders(folder: Path, tasks: int = 2) -> tuple[Path, list[Path]]:
    """Hugging Face folders (save_pretrained) of a tiny GPT-2 (Conv1D, tied embeddings) and fine-tuned copies."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return save_pretrained_with_tasks(folder, GPT2LMHeadModel(config), tasks)


def save_pretrained_with_tasks(folder: Path, base: nn.Module, tasks: int) -> tuple[Path, list[Path]]:
    """``base`` saved (save_pretrained) to folder/base and ``tasks`` perturbed copies to folder/task{i}."""
    base.save_pretrained(folder / "base")
    paths = []
    for i in range(tasks):
        perturbed(base, seed=i + 1, rank=2).save_pretrained(folder / f"task{i}")
        paths.append(folder / f"task{i}")
    return folder / "base", paths


def adapt_tasks(batches: int = 2, classes: int = 3) -> dict[str, Any]:
    """Two tasks of unlabeled 32×32 images (fixed seed), each with its own linear head on the ViT's logits."""
    from mergemodules import Task

    gen = torch.Generator().manual_seed(0)
    tasks = {}
    for name in ("cars", "digits"):
        head = nn.Linear(TIMM_KWARGS["num_classes"], classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
            head.bias.zero_()
        data = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(batches)]
        tasks[name] = Task(data, head)
    return tasks


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def callable_recipe(folder: Path, marker: Path) -> Path:
    """recipe.yaml naming ``model: {callable: arch.py:build}`` (the small timm ViT); importing arch.py creates ``marker``."""
    (folder / "arch.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "import timm\n"
                                    "def build(**kw):\n"
                                    "    return timm.create_model('vit_tiny_patch16_224', **kw)\n")
    recipe = timm_recipe(folder, tasks=2)
    recipe["model"] = {"callable": "arch.py:build", "kwargs": recipe["model"]["kwargs"]}
    return write_recipe(folder, recipe)
