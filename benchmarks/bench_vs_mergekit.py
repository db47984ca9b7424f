"""mergemodules vs mergekit on the same Llama-architecture checkpoints: merge time, peak memory, outputs.

The script writes a random-init Llama base and T "fine-tuned" copies (base + small noise) as Hugging
Face folders, then runs, for every method both libraries have (linear = weight averaging, task
arithmetic, TIES) and every dtype asked for, ``mergemodules merge RECIPE`` and mergekit's
``run_merge`` on the same inputs, each in its own fresh process, interleaved, ``--repeats`` times.
Each process times its merge call (recipe/config parsing included; interpreter start-up and imports
excluded: the model's transformers class is imported before the clock starts)
and reports its peak RSS. Outputs are compared tensor by tensor (bit-identical count and the
largest difference); TIES conventions differ between the two (see docs/methods.md), so its
difference is reported, not required to be zero.

mergekit lives in its own virtual environment (it pins other transformers/accelerate versions):
``--mergekit-python`` (default ``.venv-mergekit/bin/python``), created with
``python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install "torch==2.14.1" mergekit`` if missing.

    .venv/bin/python benchmarks/bench_vs_mergekit.py --tasks 4 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # our method, our options, mergekit method, mergekit per-model parameters, mergekit global parameters
    "linear": ("weight_averaging", {}, "linear", {"weight": 1.0}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.3}, "task_arithmetic", {"weight": 0.3}, {"normalize": False}),
    "ties": ("ties", {"density": 0.2, "scaling": 1.0}, "ties", {"weight": 1.0, "density": 0.2},
             {"normalize": False}),
}


# ------------------------------------------------------------------------------ child processes


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(recipe: str, out: str) -> dict:
    """Time ``mergemodules merge`` inside this process (the model class imported first, as mergekit's are)."""
    import transformers
    import yaml
    from mergemodules.cli import main

    with open(recipe, encoding="utf-8") as f:
        base = yaml.safe_load(f)["model"]["hf"]
    getattr(transformers, transformers.AutoConfig.from_pretrained(base).architectures[0])
    start = time.perf_counter()
    code = main(["merge", recipe, "-o", out, "-q", "--force"])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"mergemodules merge exited {code}")
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def run_mergekit(config: str, out: str) -> dict:
    """Time mergekit's ``run_merge`` inside this process."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    start = time.perf_counter()
    with open(config, encoding="utf-8") as f:
        merge_config = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(merge_config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


# ------------------------------------------------------------------------------------- the parent


def make_zoo(folder: Path, tasks: int, dtype: str, hidden: int, layers: int, vocab: int, seed: int) -> list[Path]:
    """A random Llama base and ``tasks`` noisy copies, saved with ``save_pretrained`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                         vocab_size=vocab, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(getattr(torch, dtype))
    paths = [folder / "base"]
    base.save_pretrained(paths[0])
    state = base.state_dict()
    for t in range(tasks):
        tuned = LlamaForCausalLM(config).to(getattr(torch, dtype))
        tuned.load_state_dict({k: v + 0.01 * v.float().std() * torch.randn_like(v.float()).to(v.dtype)
                               for k, v in state.items()})
        paths.append(folder / f"task{t}")
        tuned.save_pretrained(paths[-1])
    return paths


def write_configs(folder: Path, zoo: list[Path], name: str, dtype: str) -> tuple[Path, Path]:
    """Our recipe and mergekit's config for the same merge."""
    import yaml

    ours, our_options, theirs, per_model, global_params = METHODS[name]
    recipe = {"model": {"hf": str(zoo[0])}, "tasks": [str(p) for p in zoo[1:]], "method": ours,
              "options": our_options, "dtype": dtype}
    models = [{"model": str(p), "parameters": dict(per_model)} for p in zoo[1:]]
    config = {"merge_method": theirs, "models": models, "dtype": dtype, "parameters": global_params}
    if theirs != "linear":
        config["base_model"] = str(zoo[0])
    paths = folder / f"{name}-{dtype}-ours.yaml", folder / f"{name}-{dtype}-mergekit.yaml"
    paths[0].write_text(yaml.safe_dump(recipe))
    paths[1].write_text(yaml.safe_dump(config))
    return paths


def child(python: str, who: str, config: Path, out: Path) -> dict:
    """Run one merge in a fresh process and return its timing."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [python, __file__, "--child", who, str(config), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{who} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    """(fraction of tensors bit-identical, largest absolute difference) between two output folders."""
    import torch
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
        return state

    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        raise RuntimeError(f"outputs hold different keys: {sorted(set(a) ^ set(b))[:5]}")
    same = sum(torch.equal(a[k], b[k]) for k in a)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return same / len(a), worst


def main() -> None:
    """Build the zoo, run both libraries interleaved, print and return the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("WHO", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--mergekit-python", default=str(ROOT / ".venv-mergekit" / "bin" / "python"))
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    if args.child:
        who, config, out = args.child
        print(json.dumps((run_ours if who == "ours" else run_mergekit)(config, out)))
        return
    if not Path(args.mergekit_python).exists():
        raise SystemExit(f"--mergekit-python {args.mergekit_python} does not exist; create it with: python3 -m venv "
                         ".venv-mergekit && .venv-mergekit/bin/pip install 'torch==2.14.1' mergekit")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for dtype in args.dtypes:
            folder = Path(tmp) / dtype
            zoo = make_zoo(folder, args.tasks, dtype, args.hidden, args.layers, args.vocab, seed=0)
            for name in args.methods:
                recipe, config = write_configs(folder, zoo, name, dtype)
                times: dict[str, list[dict]] = {"ours": [], "mergekit": []}
                for _ in range(args.repeats):  # interleaved: both see the same machine load
                    times["ours"].append(child(sys.executable, "ours", recipe, folder / "out-ours"))
                    times["mergekit"].append(child(args.mergekit_python, "mergekit", config, folder / "out-mk"))
                same, worst = compare(folder / "out-ours", folder / "out-mk")
                med = {who: statistics.median(r["seconds"] for r in runs) for who, runs in times.items()}
                rss = {who: max(r["peak_rss_mib"] for r in runs) for who, runs in times.items()}
                rows.append((name, dtype, med["ours"], med["mergekit"], med["ours"] / med["mergekit"],
                             rss["ours"], rss["mergekit"], same, worst))
                print(rows[-1], flush=True)
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, T = {args.tasks}, "
          f"median of {args.repeats} interleaved runs, {os.cpu_count()} CPUs\n")
    print("| method | dtype | ours (s) | mergekit (s) | ours / mergekit | peak RSS ours (MiB) | peak RSS mergekit "
          "(MiB) | tensors bit-identical | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, dtype, ours, mk, ratio, rss_ours, rss_mk, same, worst in rows:
        print(f"| {name} | {dtype} | {ours:.3f} | {mk:.3f} | {ratio:.2f}× | {rss_ours:.0f} | {rss_mk:.0f} | "
              f"{same:.0%} | {worst:.2e} |")


if __name__ == "__main__":
    main()
