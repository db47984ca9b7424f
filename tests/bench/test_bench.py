"""The benchmark on a tiny configuration: real data, a tiny zoo, every method, the cache's guarantees."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.accuracy import data as D
from benchmarks.accuracy import table as T
from benchmarks.accuracy import zoo as Z
from tiny import TEXT_TASKS, tiny_text_config  # tests/bench/tiny.py


def test_splits_are_disjoint_and_deterministic():
    a = D.load_task("digits", D.Sizes(100, 40, 20, 100), seed=3)
    b = D.load_task("digits", D.Sizes(100, 40, 20, 100), seed=3)
    assert a.fingerprint() == b.fingerprint()
    rows = {s: {x.tobytes() for x in getattr(a, s).x} for s in ("train", "val", "tta", "test")}
    assert not (rows["train"] & rows["test"]) and not (rows["train"] & rows["val"]) and not (rows["tta"] & rows["test"])


def test_zoo_manifest_reuse_and_corruption(text_zoo, caplog):
    zoo = text_zoo
    cache = os.path.dirname(zoo.directory)
    manifest = json.load(open(os.path.join(zoo.directory, "manifest.json")))
    entries = manifest["tasks"]
    assert sorted(e["task"] for e in entries.values()) == sorted(TEXT_TASKS)
    for e in entries.values():
        assert len(e["sha256"]) == 64 and Z.sha256_file(os.path.join(zoo.directory, e["file"])) == e["sha256"]
        assert {"seed", "hparams", "accuracy", "data_sha256", "linear_probe_accuracy", "zero_shot_accuracy"} <= set(e)
        assert e["zero_shot_accuracy"]["test"] >= 0.0
    # a second run reuses everything
    again = Z.build_zoo(tiny_text_config(), cache)
    assert again.rebuilt == []
    # corrupt one checkpoint: detected by its hash and rebuilt, identical to the original
    victim = next(iter(entries.values()))
    path = os.path.join(zoo.directory, victim["file"])
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"garbage!")
    with caplog.at_level("WARNING"):
        rebuilt = Z.build_zoo(tiny_text_config(), cache)
    assert rebuilt.rebuilt == [victim["task"]]
    assert "sha256 mismatch" in caplog.text
    fresh = json.load(open(os.path.join(zoo.directory, "manifest.json")))["tasks"]
    assert Z.sha256_file(path) == fresh[os.path.basename(path)[: -len(".safetensors")]]["sha256"]
    assert Z.sha256_file(path) == victim["sha256"]  # the same bytes: a rebuild keeps its row-cache keys
    # a partial write (missing file) is rebuilt too
    os.unlink(path)
    assert Z.build_zoo(tiny_text_config(), cache).rebuilt == [victim["task"]]
    assert not [f for f in os.listdir(zoo.directory) if f.endswith(".tmp")]


def test_saved_tensors_are_byte_reproducible_with_several_metadata_fields(tmp_path):
    from safetensors import safe_open

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    meta = {"task": "t", "classes": ["a", "b"], "seed": 3}
    digests = {Z.atomic_save_tensors(tensors, str(tmp_path / f"{i}.safetensors"), meta) for i in range(16)}
    assert len(digests) == 1  # several safetensors metadata keys would come out in a different order per call
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[Z.ZOO_METADATA_KEY]) == meta


def test_every_method_runs_on_the_tiny_text_zoo(text_zoo):
    rc = T.RunConfig(tta_steps=2, awd_steps=3, grid=(0.3, 1.0))
    results = T.run_all(text_zoo, rc)
    assert [r.label for r in results] == [r.label for r in T.ROWS]
    for r in results:
        assert r.status == "ok", r
        assert set(r.test) == set(TEXT_TASKS) and all(0.0 <= v <= 1.0 for v in r.test.values())
        assert {k: float(v.mean()) for k, v in r.correct.items()} == r.test
    from benchmarks.accuracy.report import accuracy_table

    table = accuracy_table(text_zoo, results)
    assert "| Task Arithmetic |" in table and "(n=48)" in table
    ranks = T.cart_rank_sweep(text_zoo, (0.1, 1.0))
    assert [r for r, _ in ranks] == [0.1, 1.0]


def test_unknown_method_is_the_library_error(text_zoo):
    from mergemodules import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="no_such_method_xyz"):
        T.run_row(text_zoo, T.Row("Nonexistent", "no_such_method_xyz"), T.RunConfig(), {})


def test_run_suite_writes_table_section_plots_and_keeps_other_sections(text_zoo, tmp_path):
    from benchmarks.accuracy.report import run_suite

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Someone else's section\nkeep me\n")
    rc = T.RunConfig(tta_steps=2, awd_steps=2, grid=(0.5,), cart_ranks=(0.2, 1.0), track_examples=8,
                     rows=("Pretrained", "Individual", "Task Arithmetic", "CART+AdaRank"))
    cache = os.path.dirname(text_zoo.directory)
    out = run_suite(tiny_text_config(), rc, cache_dir=cache, results_md=str(md), plots_dir=str(tmp_path / "plots"),
                    json_dir=str(tmp_path), command="test")  # replacing a section again: test_report.py
    text = md.read_text()
    assert "keep me" in text and text.count("BEGIN -->") == 1 and "| Task Arithmetic |" in text
    assert os.path.isfile(out["plots"]["cart_rank"]) and os.path.isfile(out["json"])
    assert {"masks_CART+AdaRank", "adaptation", "lambda", "cosine", "spectra"} <= set(out["plots"])
    assert all(os.path.getsize(p) > 1000 for p in out["plots"].values())
    assert "CART+AdaRank" in text and "not run: Weight Averaging, TIES" in text
    saved = json.loads(Path(out["json"]).read_text())
    assert saved["rows_complete"] is True and saved["diagnostics"]["cosine"] and saved["command"] == "test"


def test_a_run_cut_short_keeps_the_rows_it_ended_in_its_json(text_zoo, tmp_path, monkeypatch):
    from benchmarks.accuracy.report import run_suite

    run_row = T.run_row

    def cut_at_cart(zoo, row, *args, **kwargs):
        if row.label == "CART":
            raise KeyboardInterrupt  # the machine taken back mid-row
        return run_row(zoo, row, *args, **kwargs)

    monkeypatch.setattr(T, "run_row", cut_at_cart)
    monkeypatch.setattr(T.rowcache, "scratch", lambda *args: None)  # no resumable folder left in the shared zoo
    rc = T.RunConfig(grid=(0.5,), seed=11, rows=("Weight Averaging", "Task Arithmetic", "CART"))
    with pytest.raises(KeyboardInterrupt):
        run_suite(tiny_text_config(), rc, cache_dir=os.path.dirname(text_zoo.directory), json_dir=str(tmp_path))
    saved = json.loads(next(tmp_path.glob("results-*.json")).read_text())
    assert saved["rows_complete"] is False and saved["suite"] == "text" and saved["date"].endswith(" UTC")
    assert [r["label"] for r in saved["results"]] == ["Weight Averaging", "Task Arithmetic"]


def test_rows_are_read_back_from_the_row_cache_until_an_input_changes(text_zoo, monkeypatch, caplog):
    from benchmarks.accuracy import rowcache

    rc = T.RunConfig(tta_steps=2, track_every=1, plateau_window=1, track_examples=4, grid=(0.4,), seed=7,
                     rows=("Task Arithmetic", "CART+AdaRank"))
    keep: dict = {}
    first = T.run_all(text_zoo, rc, keep=keep)
    assert set(keep) == {"CART+AdaRank"} and all(m.dtype == torch.bool for m in keep["CART+AdaRank"].values())
    assert not list((Path(text_zoo.directory) / "rows").glob("*.partial"))  # a stored row's checkpoints are gone

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached row was run again")

    monkeypatch.setattr(T, "run_row", must_not_run)
    kept_again: dict = {}
    again = T.run_all(text_zoo, rc, keep=kept_again)
    for a, b in zip(first, again):
        assert (a.label, a.test, a.chosen, a.adaptation["track"] if a.adaptation else None) == \
            (b.label, b.test, b.chosen, b.adaptation["track"] if b.adaptation else None)
        assert all(np.array_equal(a.correct[k], b.correct[k]) for k in a.correct)
        assert a.ran == b.ran and a.ran.endswith(" UTC")  # a cached row keeps the date it ran
    assert all(torch.equal(keep["CART+AdaRank"][k], kept_again["CART+AdaRank"][k]) for k in keep["CART+AdaRank"])
    # another budget's checkpoints in the same zoo folder (the default's beside --full's) change no row's key
    text_zoo.manifest["tasks"]["foldoc-other"] = {"sha256": "0" * 64}
    assert [r.test for r in T.run_all(text_zoo, rc)] == [r.test for r in first]
    del text_zoo.manifest["tasks"]["foldoc-other"]
    with pytest.raises(AssertionError, match="cached row"):  # another step budget is another entry
        T.run_all(text_zoo, dataclasses.replace(rc, tta_steps=3))
    with pytest.raises(AssertionError, match="cached row"):  # so is an edit of the library or benchmark source
        monkeypatch.setattr(rowcache, "code_digest", lambda: "edited")
        T.run_all(text_zoo, rc)
    monkeypatch.undo()
    # a truncated entry is run again, with a warning
    entry = next(p for p in (Path(text_zoo.directory) / "rows").glob("task_arithmetic-*.npz")
                 if rowcache.key(text_zoo, "Task Arithmetic", rc, {}) in p.name)
    entry.write_bytes(entry.read_bytes()[:20])
    with caplog.at_level("WARNING"):
        assert T.run_all(text_zoo, rc, cache=True)[0].test == first[0].test
    assert "unreadable entry" in caplog.text


def test_cli_help_and_presets(capsys):
    from benchmarks.accuracy import presets
    from benchmarks.accuracy.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--full" in capsys.readouterr().out
    for suite in ("text", "vision"):
        small, _ = presets.get(suite)
        full, _ = presets.get(suite, full=True)
        assert set(small.tasks) <= set(full.tasks) and small.finetune.steps <= full.finetune.steps
    # issue #12: ≥ 6 vision tasks; text --full keeps 4 so that a seed runs within one session (presets.py)
    assert len(presets.get("text", full=True)[0].tasks) >= 4 and len(presets.get("vision", full=True)[0].tasks) >= 6
    # the decoder has one budget: --full runs it on 3 seeds under the default's names, so seeds run apart combine
    assert presets.get("decoder", full=True) == presets.get("decoder")
    assert [presets.preset_name(s, True) for s in ("text", "vision", "decoder")] == ["full", "full", "default"]
    assert presets.preset_name("decoder", False) == "default" and len(presets.FULL_SEEDS) >= 3
