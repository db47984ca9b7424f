"""mergemodules vs mergekit on the same Llama-architecture checkpoints: merge time, peak memory, outputs.

The script writes a random-init Llama base and T "fine-tuned" copies (base + small noise) as Hugging
Face folders, then runs, for every method both libraries have (linear = weight averaging, task
arithmetic, TIES) and every dtype asked for, ``mergemodules merge RECIPE`` and mergekit's
``run_merge`` on the same inputs, each in its own fresh process, interleaved, ``--repeats`` times.
Each process times its merge call (recipe/config parsing included; interpreter start-up and imports
excluded: the model's transformers class is imported before the clock starts)
and reports its peak RSS. Outputs are compared tensor by tensor (bit-identical count and the
largest difference). TIES runs with mergekit's conventions on both sides (our ``scope: tensor``: exactly
int(d·n) entries per tensor, sign + where the sum is ≥ 0, disjoint mean; mergekit ``normalize: true``), which
differ only in how entries tied with the threshold are picked, so its difference is reported, not required to be zero.

mergekit lives in its own virtual environment (it pins other transformers/accelerate versions):
``--mergekit-python`` (default ``.venv-mergekit/bin/python``), created with
``python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install "torch==2.14.1" mergekit`` if missing.

LLM-sized runs (issue #14): ``--preset 1gb`` (hidden 2048, 10 layers, vocab 32000: 1.21 GB in bf16, inputs
saved in 400 MB shards, outputs written in 500 MB shards), several ``--tasks`` from one zoo,
``--compute-dtype float32`` (both libraries merge in float32 and write the checkpoints' dtype) and ``--cold``
(the page cache dropped before every merge, as root). Each merge also reports the bytes it read from the
disk (``read_bytes`` of /proc/self/io), its input read rate (the input files' bytes ÷ its time), and the
script times ``cat FILES > /dev/null`` of the same files, cold and then warm: the raw read rate.

    .venv/bin/python benchmarks/bench_vs_mergekit.py --tasks 4 --repeats 5
    .venv/bin/python benchmarks/bench_vs_mergekit.py --preset 1gb --tasks 4 8 --dtypes bfloat16 \\
        --compute-dtype float32 --methods task_arithmetic ties --repeats 1 --cold --skip ties:8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
    "ties": ("ties", {"density": 0.2, "scaling": 1.0, "scope": "tensor"}, "ties", {"weight": 1.0, "density": 0.2},
             {"normalize": True}),  # mergekit's rule: per-tensor trim, disjoint mean (docs/methods.md)
}
PRESETS = {  # hidden, layers, vocab, input shard size, output shard size (None: the libraries' defaults)
    "small": (512, 4, 8192, None, None),
    "1gb": (2048, 10, 32000, "400MB", "500MB"),
}


# ------------------------------------------------------------------------------ child processes


def _read_bytes() -> int:
    """Bytes this process caused to be read from the disk (page-cache hits and mmap'd pages in memory excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


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
    read = _read_bytes()
    code = main(["merge", recipe, "-o", out, "-q", "--force"])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"mergemodules merge exited {code}")
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "read_bytes": _read_bytes() - read}


def run_mergekit(config: str, out: str) -> dict:
    """Time mergekit's ``run_merge`` inside this process (``out_shard_size``, in parameters, from the config)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    start = time.perf_counter()
    read = _read_bytes()
    with open(config, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    shard = {"out_shard_size": raw.pop("out_shard_size")} if "out_shard_size" in raw else {}
    merge_config = MergeConfiguration.model_validate(raw)
    run_merge(merge_config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, **shard))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "read_bytes": _read_bytes() - read}


# ------------------------------------------------------------------------------------- the parent


def make_zoo(folder: Path, tasks: int, dtype: str, hidden: int, layers: int, vocab: int, seed: int,
             shard_size: str | None = None) -> list[Path]:
    """A random Llama base and ``tasks`` noisy copies, saved with ``save_pretrained`` in ``dtype`` (in shards of
    ``shard_size`` when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                         vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    shards = {} if shard_size is None else {"max_shard_size": shard_size}
    paths = [folder / "base"]
    model.save_pretrained(paths[0], **shards)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(tasks):  # one model object, reloaded: building a new one per task costs its random init
        with torch.no_grad():
            for key, param in model.state_dict().items():
                base = state[key]
                noise = torch.randn(base.shape) * (0.01 * float(base.float().std()))
                param.copy_((base.float() + noise).to(base.dtype))
        paths.append(folder / f"task{t}")
        model.save_pretrained(paths[-1], **shards)
    return paths


def write_configs(folder: Path, zoo: list[Path], name: str, dtype: str, compute: str | None = None,
                  max_shard_size: str | None = None) -> tuple[Path, Path]:
    """Our recipe and mergekit's config for the same merge of the base and ``zoo[1:]``: in ``dtype``, or in
    ``compute`` written in ``dtype``; outputs in shards of ``max_shard_size`` when given."""
    import torch
    import yaml

    from mergemodules.safetensors_files import parse_size

    ours, our_options, theirs, per_model, global_params = METHODS[name]
    recipe = {"model": {"hf": str(zoo[0])}, "tasks": [str(p) for p in zoo[1:]], "method": ours,
              "options": our_options, "dtype": compute or dtype}
    models = [{"model": str(p), "parameters": dict(per_model)} for p in zoo[1:]]
    config = {"merge_method": theirs, "models": models, "dtype": compute or dtype, "parameters": global_params}
    if compute:
        recipe["out_dtype"] = config["out_dtype"] = dtype
    if max_shard_size:  # mergekit counts parameters per shard, we count bytes
        recipe["max_shard_size"] = max_shard_size
        config["out_shard_size"] = parse_size(max_shard_size) // getattr(torch, dtype).itemsize
    if theirs != "linear":
        config["base_model"] = str(zoo[0])
    tag = f"{name}-{dtype}-T{len(zoo) - 1}"
    paths = folder / f"{tag}-ours.yaml", folder / f"{tag}-mergekit.yaml"
    paths[0].write_text(yaml.safe_dump(recipe))
    paths[1].write_text(yaml.safe_dump(config))
    return paths


def drop_page_cache() -> None:
    """Write dirty pages back and drop the page cache (root only), so the next reads come from the disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def input_files(zoo: list[Path]) -> list[Path]:
    """The safetensors files of the checkpoint folders."""
    return [f for folder in zoo for f in sorted(folder.glob("*.safetensors"))]


def cat_seconds(files: list[Path]) -> float:
    """Seconds of ``cat FILES > /dev/null``: the raw read rate of these files (from the disk or the cache)."""
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def uptime() -> str:
    """The load averages, as ``uptime`` prints them."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def child(python: str, who: str, config: Path, out: Path, cold: bool = False) -> dict:
    """Run one merge in a fresh process and return its timing (after dropping the page cache if ``cold``).

    Dirty pages are written back first (``sync``): the zoo just written, or the previous run's output, would
    otherwise be flushed during this run and slow whichever library runs then. The previous run's output is
    removed first too: each library writes a new folder, and none pays for freeing the last one's blocks.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cold:
        drop_page_cache()
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
    parser.add_argument("--tasks", type=int, nargs="+", default=[4], help="T values (one zoo of the largest)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="the checkpoints' dtypes")
    parser.add_argument("--compute-dtype", help="merge in this dtype and write the checkpoints' (default: merge in it)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--preset", choices=list(PRESETS), default="small", help="model size: " + ", ".join(
        f"{name} = hidden {h}, {n} layers, vocab {v}" for name, (h, n, v, _, _) in PRESETS.items()))
    parser.add_argument("--hidden", type=int, help="override the preset's")
    parser.add_argument("--layers", type=int, help="override the preset's")
    parser.add_argument("--vocab", type=int, help="override the preset's")
    parser.add_argument("--input-shard-size", help="save the checkpoints in shards of this size, e.g. 400MB")
    parser.add_argument("--max-shard-size", help="write the outputs in shards of this size, e.g. 500MB")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every merge (root)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="METHOD:T", help="cases not to run, e.g. ties:8")
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
    hidden, layers, vocab, input_shards, output_shards = PRESETS[args.preset]
    hidden, layers, vocab = args.hidden or hidden, args.layers or layers, args.vocab or vocab
    input_shards, output_shards = args.input_shard_size or input_shards, args.max_shard_size or output_shards
    load = [uptime()]
    rows, reads = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dtype in args.dtypes:
            folder = Path(tmp) / dtype
            zoo = make_zoo(folder, max(args.tasks), dtype, hidden, layers, vocab, seed=0, shard_size=input_shards)
            model_bytes = sum(f.stat().st_size for f in input_files(zoo[:1]))
            for T in args.tasks:
                files = input_files(zoo[:T + 1])
                size = sum(f.stat().st_size for f in files)
                if args.cold:
                    drop_page_cache()
                first, second = cat_seconds(files), cat_seconds(files)
                reads.append((dtype, T, size, first, second))
                for name in [m for m in args.methods if f"{m}:{T}" not in args.skip]:
                    recipe, config = write_configs(folder, zoo[:T + 1], name, dtype, args.compute_dtype, output_shards)
                    runs: dict[str, list[dict]] = {"ours": [], "mergekit": []}
                    for _ in range(args.repeats):  # interleaved: both see the same machine load
                        runs["ours"].append(child(sys.executable, "ours", recipe, folder / "out-ours", args.cold))
                        runs["mergekit"].append(child(args.mergekit_python, "mergekit", config, folder / "out-mk",
                                                      args.cold))
                    same, worst = compare(folder / "out-ours", folder / "out-mk")
                    shards = len(list((folder / "out-ours").glob("*.safetensors")))
                    shutil.rmtree(folder / "out-ours")
                    shutil.rmtree(folder / "out-mk")
                    med = {who: statistics.median(r["seconds"] for r in rs) for who, rs in runs.items()}
                    rss = {who: max(r["peak_rss_mib"] for r in rs) for who, rs in runs.items()}
                    disk = {who: max(r["read_bytes"] for r in rs) for who, rs in runs.items()}
                    rows.append((name, dtype, T, med["ours"], med["mergekit"], rss["ours"], rss["mergekit"],
                                 size / med["ours"], size / med["mergekit"], disk["ours"], disk["mergekit"],
                                 same, worst, shards))
                    print(rows[-1], flush=True)
    load.append(uptime())
    compute = f"computed in {args.compute_dtype}, written in the checkpoints' dtype" if args.compute_dtype else \
        "computed and written in the checkpoints' dtype"
    print(f"\nLlama hidden {hidden}, {layers} layers, vocab {vocab}: {model_bytes / 1e9:.2f} GB per checkpoint "
          f"(last dtype), inputs in {input_shards or 'one file'} shards, outputs in {output_shards or 'default'} "
          f"shards; {compute}; median of {args.repeats} interleaved runs, page cache "
          f"{'dropped before every merge' if args.cold else 'as it was (files probably cached)'}; "
          f"{os.cpu_count()} CPUs\nload before: {load[0]}\nload after:  {load[1]}\n")
    print("| method | dtype | T | ours (s) | mergekit (s) | ours / mergekit | peak RSS ours (MiB) | peak RSS mergekit "
          "(MiB) | input read rate ours (MB/s) | mergekit (MB/s) | read from disk ours (GB) | mergekit (GB) | "
          "tensors bit-identical | max abs diff | output files (ours) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, dtype, T, ours, mk, rss_ours, rss_mk, rate_ours, rate_mk, disk_ours, disk_mk, same, worst, shards \
            in rows:
        print(f"| {name} | {dtype} | {T} | {ours:.3g} | {mk:.3g} | {ours / mk:.2f}× | {rss_ours:.0f} | {rss_mk:.0f} "
              f"| {rate_ours / 1e6:.0f} | {rate_mk / 1e6:.0f} | {disk_ours / 1e9:.2f} | {disk_mk / 1e9:.2f} | "
              f"{same:.0%} | {worst:.2e} | {shards} |")
    print("\n| dtype | T | input files (GB) | cat, first read (MB/s) | cat, second read (MB/s) |")
    print("| --- | --- | --- | --- | --- |")
    for dtype, T, size, first, second in reads:
        print(f"| {dtype} | {T} | {size / 1e9:.2f} | {size / first / 1e6:.0f} | {size / second / 1e6:.0f} |")


if __name__ == "__main__":
    main()
