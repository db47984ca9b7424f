"""mergemodules' Task Arithmetic of a decoder zoo against mergekit's, on the same exported checkpoints.

The zoo's pretrained and fine-tuned decoders are written as Hugging Face ``LlamaForCausalLM`` folders
(tied LM head, as SmolLM2 ships); mergekit's ``task_arithmetic`` merges them in its own virtual
environment (``.venv-mergekit``, see ``benchmarks/bench_vs_mergekit.py``) and mergemodules' fused
merge is exported the same way. Reported: the share of bit-identical tensors, the largest weight
difference and the largest logit difference of the two merged models reloaded by transformers::

    python -m benchmarks.accuracy.decoder_mergekit --suite decoder [--cache DIR] [--scaling 0.3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import decoder as bdec

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_PYTHON = ROOT / ".venv-mergekit" / "bin" / "python"


def export(encoder: nn.Module, folder: Path) -> Path:
    """Write ``encoder`` (a DecoderEncoder, fused) as a Hugging Face causal-LM folder with its tied LM head."""
    bdec.to_causal_lm(encoder).save_pretrained(folder)
    return folder


def compare_with_mergekit(pretrained: nn.Module, finetuned: list[nn.Module], scaling: float, folder: Path,
                          input_ids: torch.Tensor, mergekit_python: Path = MERGEKIT_PYTHON) -> dict[str, Any]:
    """Task Arithmetic (θ₀ + λ Σ τ_t) by mergemodules and by mergekit on the same checkpoints: their differences."""
    import yaml
    from transformers import LlamaForCausalLM

    import mergemodules as mm
    from benchmarks.bench_vs_mergekit import child, compare

    if not Path(mergekit_python).is_file():
        raise FileNotFoundError(f"mergekit_python={str(mergekit_python)!r}: no such interpreter (see bench_vs_mergekit)")
    folder.mkdir(parents=True, exist_ok=True)
    base = export(pretrained, folder / "base")
    tasks = [export(f, folder / f"task{i}") for i, f in enumerate(finetuned)]
    export(mm.merge(pretrained, finetuned, "task_arithmetic", scaling=scaling).fuse(), folder / "ours")
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(t), "parameters": {"weight": scaling}} for t in tasks],
              "parameters": {"normalize": False}}
    (folder / "mergekit.yaml").write_text(yaml.safe_dump(config))
    child(str(mergekit_python), "mergekit", folder / "mergekit.yaml", folder / "theirs")
    identical, weight_diff = compare(folder / "ours", folder / "theirs")
    with torch.no_grad():
        logits = [LlamaForCausalLM.from_pretrained(folder / who, dtype=torch.float32).eval()(input_ids=input_ids).logits
                  for who in ("ours", "theirs")]
    return {"tasks": len(tasks), "scaling": scaling, "identical_tensors": identical, "max_weight_diff": weight_diff,
            "max_logit_diff": float((logits[0] - logits[1]).abs().max())}


def main(argv: list[str] | None = None) -> int:
    """Compare on a cached decoder zoo (built if missing) and print the differences as JSON."""
    import tempfile

    from . import presets
    from .zoo import build_zoo

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.decoder_mergekit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the decoder zoo of this seed (default 0)")
    p.add_argument("--cache", default=None, help="zoo cache directory")
    p.add_argument("--scaling", type=float, default=0.3, help="λ of Task Arithmetic (default 0.3)")
    p.add_argument("--mergekit-python", default=str(MERGEKIT_PYTHON))
    args = p.parse_args(argv)
    cfg, _ = presets.get("decoder")
    cfg = presets.replace(cfg, seed=args.seed)
    zoo = build_zoo(cfg, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = compare_with_mergekit(zoo.pretrained, [t.encoder for t in zoo.tasks], args.scaling, Path(tmp),
                                    zoo.tasks[0].x["test"][:4], Path(args.mergekit_python))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
