"""The report's numbers: normalized accuracy, the seeds table, the RESULTS sections."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_text_config  # tests/bench/tiny.py

from benchmarks.accuracy import report as R
from benchmarks.accuracy import table as T


def _result(label: str, acc: dict[str, float], n: int = 100) -> T.Result:
    correct = {k: np.arange(n) < round(v * n) for k, v in acc.items()}
    return T.Result(label, None, "ok", test={k: float(c.mean()) for k, c in correct.items()}, correct=correct)


def test_normalized_is_merged_over_individual_per_task():
    ind, ta = _result("Individual", {"a": 0.8, "b": 0.5}), _result("Task Arithmetic", {"a": 0.6, "b": 0.5})
    assert R.normalized(ta, R._individual([ind, ta])) == pytest.approx({"a": 0.75, "b": 1.0})
    assert R.normalized(ta, {}) == {}


def test_seeds_table_gives_mean_std_and_range_of_each_mean():
    per_seed = {s: [_result("Individual", {"a": 0.8}), _result("CART", {"a": acc})]
                for s, acc in ((0, 0.60), (1, 0.64), (2, 0.68))}
    table = R.seeds_table(per_seed)
    cart = next(line for line in table.splitlines() if line.startswith("| CART |"))
    # mean 64.0, sample std 4.0, range [60.0, 68.0]; normalized 80.0 ± 5.0
    assert "**64.0** ± 4.0 [60.0, 68.0]" in cart and "80.0 ± 5.0" in cart and cart.endswith("| 60.0 | 64.0 | 68.0 |")


def test_accuracy_table_shows_wilson_and_mean_intervals():
    class _Zoo:  # the two attributes the table reads
        names = ["a"]
        tasks = [type("t", (), {"name": "a", "y": {"test": np.zeros(100)}})]

    table = R.accuracy_table(_Zoo(), [_result("Individual", {"a": 0.8}), _result("CART", {"a": 0.5})])
    cart = next(line for line in table.splitlines() if line.startswith("| CART |"))
    # Wilson 50/100: [40.4, 59.6]; the mean of one task: 50 ± 1.96·5 = [40.2, 59.8]; normalized 62.5
    assert "50.0 ±9.6" in cart and "**50.0** [40.2, 59.8]" in cart and "| 62.5 |" in cart


def test_write_section_replaces_only_its_block(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("# R\n\nkeep\n")
    R.write_section(str(md), "x", "one")
    R.write_section(str(md), "y", "two")
    R.write_section(str(md), "x", "three")
    text = md.read_text()
    assert "keep" in text and "one" not in text and text.index("three") < text.index("two")


def test_the_header_says_when_the_rows_ran():
    rows = [_result("A", {"t": 0.5}), _result("B", {"t": 0.5}), _result("C", {"t": 0.5})]
    assert R._rows_ran(rows) == ""  # rows cached before the date was kept
    rows[0].ran, rows[1].ran = "2026-11-27 10:05 UTC", "2026-11-26 23:59 UTC"
    assert R._rows_ran(rows) == " (rows run from 2026-11-26 23:59 UTC to 2026-11-27 10:05 UTC)"
    assert R._rows_ran(rows[:1]) == " (rows run at 2026-11-27 10:05 UTC)"


def test_diagnostics_line_states_the_numbers():
    diag = {"cosine": [[1, 0.1], [-0.3, 1]], "cosine_centered": [[1, -1], [-1, 1]],
            "spectra": {"a": [(0.08, 0.5)], "b": [(0.08, 0.7)]}, "spectra_centered": {"a": [(0.08, 0.9)], "b": [(0.08, 0.9)]}}
    cart = _result("CART", {"a": 0.6, "b": 0.6})
    cart.chosen, cart.paper = {"scaling": 0.3}, {"scaling": 1.0, "test_mean": 0.55}
    ada = _result("CART++", {"a": 0.6, "b": 0.6})
    ada.adaptation = {"converged": False}
    line = R.diagnostics_line([cart, ada], diag)
    assert "|cos| of τ 0.20 (of centered τ̄ 1.00)" in line and "keep 0.60 of ‖τ‖² (0.90 of ‖τ̄‖²)" in line
    assert "CART λ 0.3 on val vs paper 1: test 60.0 vs 55.0" in line and "within the budget: CART++" in line


def _results_json(path, seed: int, cart: float, preset: str = "full", suite: str = "decoder") -> str:
    results = [_result("Individual", {"a": 0.8}), _result("Weight Averaging", {"a": cart - 0.02}),
               _result("CART", {"a": cart})]
    obj = {"suite": suite, "preset": preset, "config": {"seed": seed}, "results": [r.to_json() for r in results],
           "orderings": [f"ordering of seed {seed}"],
           "command": f"python -m benchmarks.accuracy --seeds {seed}", "date": "2026-11-27 02:00 UTC", "machine": "GPU"}
    path.write_text(json.dumps(obj, default=float))
    return str(path)


def test_seeds_from_json_gives_the_table_of_the_seeds_run_together(tmp_path):
    paths = [_results_json(tmp_path / f"r{s}.json", s, acc) for s, acc in ((2, 0.68), (0, 0.60), (1, 0.64))]
    together = R.seeds_table({s: [_result("Individual", {"a": 0.8}), _result("Weight Averaging", {"a": acc - 0.02}),
                                  _result("CART", {"a": acc})] for s, acc in ((0, 0.60), (1, 0.64), (2, 0.68))})
    md = tmp_path / "RESULTS.md"
    out = R.seeds_from_json(paths, results_md=str(md))
    assert out["table"] == together
    text = md.read_text()
    assert "decoder-full-seeds BEGIN" in text and together in text
    assert "- seed 2: `python -m benchmarks.accuracy --seeds 2` — 2026-11-27 02:00 UTC; GPU" in text
    # CART is 2 points above Weight Averaging on every seed: a zero-width t interval, significant
    over_seeds = "Weight Averaging < CART: holds (every step significant): Weight Averaging < CART (+2.0 [+2.0, +2.0], " \
                 "higher in 3/3 seeds); not run: Task Arithmetic, TIES"
    assert out["orderings"][0] == over_seeds and f"- {over_seeds}" in text
    assert text.index("- seed 0: ordering of seed 0") < text.index("- seed 1: ordering of seed 1")


def test_seeds_from_json_refuses_files_that_do_not_belong_together(tmp_path):
    a, b = _results_json(tmp_path / "a.json", 0, 0.6), _results_json(tmp_path / "b.json", 1, 0.6, preset="default")
    with pytest.raises(ValueError, match=r"b\.json: suite 'decoder', preset 'default' .* differ from .*a\.json"):
        R.seeds_from_json([a, b])
    with pytest.raises(ValueError, match=r"c\.json: seed 0 is already given"):
        R.seeds_from_json([a, _results_json(tmp_path / "c.json", 0, 0.7)])
    with pytest.raises(ValueError, match="at least two seeds, got 1"):
        R.seeds_from_json([a])
    cut = json.loads(Path(b).read_text())
    cut.update(preset="full", rows_complete=False, results=cut["results"][:1])
    Path(b).write_text(json.dumps(cut))
    with pytest.raises(ValueError, match=r"b\.json: a run cut short \(its rows so far: Individual\)"):
        R.seeds_from_json([a, b])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match=r"x\.json: not a results-\*\.json file"):
        R.seeds_from_json([a, str(tmp_path / "x.json")])


def test_cli_seeds_from_prints_the_table_and_names_a_bad_file(tmp_path, capsys):
    from benchmarks.accuracy.__main__ import main

    paths = [_results_json(tmp_path / f"r{s}.json", s, acc) for s, acc in ((0, 0.60), (1, 0.64))]
    assert main(["--seeds-from", *paths]) == 0
    assert "| CART | **62.0** ± 2.8 [60.0, 64.0]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds-from", paths[0], str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json: not a results-*.json file" in capsys.readouterr().err


def test_given_choices_come_from_a_json_of_the_same_configuration_only(tmp_path):
    cfg = tiny_text_config()
    path = tmp_path / "results.json"
    rows = [{"label": "AWD-TA", "status": "ok", "chosen": {"alpha": 1e-4, "scaling": 0.3}},
            {"label": "CART", "status": "diverged", "chosen": {"scaling": 0.5}}]
    path.write_text(json.dumps({"config": cfg.to_json(), "results": rows}))
    assert R.given_choices(str(path), cfg) == {"AWD-TA": {"alpha": 1e-4, "scaling": 0.3}}
    with pytest.raises(ValueError, match=r"results\.json: ran on another zoo configuration \(differs in seed\)"):
        R.given_choices(str(path), dataclasses.replace(cfg, seed=cfg.seed + 1))
    for i, bad in enumerate(("[]", "{", '{"config": {}, "results": [1]}', '{"config": {}, "results": [{"status": "ok"}]}',
                             '{"config": [], "results": []}')):
        (tmp_path / f"bad{i}.json").write_text(bad)
        with pytest.raises(ValueError, match=rf"bad{i}\.json: not a benchmark results JSON"):
            R.given_choices(str(tmp_path / f"bad{i}.json"), cfg)
