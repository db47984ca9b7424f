"""Your own task and suite from a file (--tasks-from), run end to end without editing the benchmark."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.accuracy import data as bdata
from benchmarks.accuracy import models, plugins

EXAMPLE = os.path.join(os.path.dirname(plugins.__file__), "examples", "my_tasks.py")
BACKBONE = os.path.join(os.path.dirname(plugins.__file__), "examples", "my_backbone.py")


@pytest.fixture
def registry(monkeypatch):
    """Registrations made by a test do not leak into the others."""
    monkeypatch.setattr(bdata, "ALL_TASKS", dict(bdata.ALL_TASKS))
    monkeypatch.setattr(plugins, "SUITES", {})
    monkeypatch.setattr(models, "VISION_BACKBONES", {})
    monkeypatch.setattr(models, "BACKBONE_FILES", {})


def test_the_example_task_file_runs_as_its_own_suite(registry, tmp_path, capsys):
    from benchmarks.accuracy.__main__ import main

    if not os.path.isdir(bdata.FORTUNE_DIR):
        pytest.skip("Debian fortunes not installed (run .ci/install-data.sh)")
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- benchmarks.accuracy text-default BEGIN -->\nbuilt-in\n<!-- benchmarks.accuracy text-default END -->\n")
    rc = main(["--tasks-from", EXAMPLE, "--suite", "fortune_pair", "--cache", str(tmp_path / "zoo"), "--json", str(tmp_path),
               "--results", str(md), "--methods", "Pretrained,Individual,Task Arithmetic,CART++", "--threads", "1", "-q"])
    assert rc == 0
    out = json.load(open(tmp_path / "results-text-fortune_pair-default-subset.json"))
    assert sorted(out["tasks"]) == ["foldoc", "fortune_pair"] and out["tasks"]["fortune_pair"]["n_test"] == 48
    rows = {r["label"]: r for r in out["results"]}
    assert set(rows) == {"Pretrained", "Individual", "Task Arithmetic", "CART++"}
    assert rows["CART++"]["adaptation"]["steps"] <= 4 and 0 <= rows["Individual"]["mean"] <= 1
    text = md.read_text()
    assert "built-in" in text and "text-fortune_pair-default-subset BEGIN" in text  # the built-in section is untouched
    assert "| fortune_pair (n=48) | foldoc (n=48) |" in capsys.readouterr().out


def test_the_example_backbone_is_merged_like_a_built_in_one(registry, tmp_path, capsys):
    from benchmarks.accuracy.__main__ import main

    rc = main(["--tasks-from", BACKBONE, "--suite", "pixel_mlp", "--cache", str(tmp_path / "zoo"), "--json", str(tmp_path),
               "--methods", "Pretrained,Individual,Task Arithmetic,TSV-M,AdaMerging (layer-wise)", "--threads", "1", "-q"])
    assert rc == 0
    out = json.load(open(tmp_path / "results-vision-pixel_mlp-default-subset.json"))
    rows = {r["label"]: r for r in out["results"]}
    assert set(rows) == {"Pretrained", "Individual", "Task Arithmetic", "TSV-M", "AdaMerging (layer-wise)"}
    assert out["config"]["vision_model"]["kind"] == "pixel_mlp" and sorted(out["tasks"]) == ["digits", "mnist"]
    assert rows["AdaMerging (layer-wise)"]["adaptation"]["lambda_after"]["n"] == 2 * 4  # 2 Linear layers × (W, b) × 2 tasks
    # the Individual row re-evaluates the cached fine-tuned backbones: the zoo's own numbers
    assert rows["Individual"]["test"] == pytest.approx({t: v["individual"]["test"] for t, v in out["tasks"].items()})
    # the zoo records the registering file as its pretrained source, and rebuilds when that file changes
    manifest = json.load(open(os.path.join(out["zoo"], "manifest.json")))
    assert BACKBONE in manifest["pretrained"]["source"] and "random init" not in manifest["pretrained"]["source"]
    from benchmarks.accuracy import zoo as Z

    assert manifest["pretrained"]["source_sha256"] == Z.sha256_file(BACKBONE)


def test_seeds_run_together_and_apart_give_one_table(registry, tmp_path, capsys):
    """``--seeds 0,1`` writes the seeds section; ``--seeds-from`` rebuilds the same table from the two JSON files."""
    from benchmarks.accuracy.__main__ import main

    md, md_apart = tmp_path / "RESULTS.md", tmp_path / "APART.md"
    rc = main(["--tasks-from", BACKBONE, "--suite", "pixel_mlp", "--seeds", "0,1", "--cache", str(tmp_path / "zoo"),
               "--json", str(tmp_path), "--results", str(md), "--methods", "Pretrained,Individual,Task Arithmetic",
               "--threads", "1", "-q"])
    assert rc == 0
    tag = "vision-pixel_mlp-default-subset"
    runs = [str(tmp_path / f"results-{tag}.json"), str(tmp_path / f"results-{tag}-seed1.json")]
    seeds = [json.load(open(path))["config"]["seed"] for path in runs]
    assert seeds == [0, 1]
    assert main(["--seeds-from", *runs, "--results", str(md_apart)]) == 0
    section = f"<!-- benchmarks.accuracy {tag}-seeds BEGIN -->"
    together, apart = md.read_text(), md_apart.read_text()
    assert section in together and section in apart
    row = next(line for line in together.split(section)[1].splitlines() if line.startswith("| Task Arithmetic |"))
    assert " ± " in row and row in apart and "seed 1: `python -m benchmarks.accuracy" in apart
    orderings = together.split(section)[1].split("orderings over seeds")[1].split("![seeds]")[0]
    assert "- seed 1: Weight Averaging < Task Arithmetic" in orderings and orderings in apart


def test_bad_registrations_name_the_problem(registry, tmp_path):
    with pytest.raises(ValueError, match="'foldoc'.*already a task"):
        plugins.register_task("foldoc", lambda sizes, seed: None, kind="text")
    with pytest.raises(ValueError, match="kind must be one of"):
        plugins.register_task("mine", lambda sizes, seed: None, kind="audio")
    plugins.register_task("mine", lambda sizes, seed: "not a task", kind="text")
    with pytest.raises(ValueError, match="task 'mine': the loader must return TaskData"):
        bdata.load_task("mine", bdata.Sizes(1, 1, 0, 1), 0)
    plugins.register_suite("s", lambda full: None)
    with pytest.raises(ValueError, match="'s'.*already registered"):
        plugins.register_suite("s", lambda full: None)
    with pytest.raises(ValueError, match="'dinov2' is empty, built in"):
        plugins.register_backbone("dinov2", lambda spec, seed: None)
    plugins.register_backbone("bare", lambda spec, seed: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backbone 'bare': build must return an nn.Module with an int feature_dim"):
        models.build_vision_encoder(models.VisionModelSpec("bare"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        plugins.load(str(tmp_path / "missing.py"))


def test_cli_rejects_bad_seeds_and_unknown_suites(capsys):
    from benchmarks.accuracy.__main__ import main

    for argv, message in ((["--seeds", "0,x"], "--seeds: comma-separated integers"),
                          (["--seeds", "1,1"], "--seeds: distinct seeds"),
                          (["--suite", "nope"], "--suite: unknown suite 'nope'"),
                          (["--device", "gpu0"], "--device: 'gpu0' is not a torch device"),
                          *([(["--device", "cuda"], "torch sees no CUDA GPU here")] if not torch.cuda.is_available() else [])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
