"""The runner's rows on the tiny text zoo: transductive adaptation and its evidence, grids, references."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.accuracy import table as T
from benchmarks.accuracy import zoo as Z


def test_references_match_the_zoo(text_zoo):
    bs = text_zoo.config.eval_batch_size
    ind = T.run_row(text_zoo, T.Row("Individual", None), T.RunConfig(), {})
    pre = T.run_row(text_zoo, T.Row("Pretrained", None), T.RunConfig(), {})
    for t in text_zoo.tasks:
        assert ind.test[t.name] == pytest.approx(t.entry["accuracy"]["test"])
        assert pre.test[t.name] == pytest.approx(Z.accuracy(text_zoo.pretrained, t.head, t.x["test"], t.y["test"], bs))
        assert len(ind.correct[t.name]) == len(t.y["test"])
    mean, lo, hi = ind.ci()
    assert lo < mean < hi and mean == pytest.approx(ind.mean)


def test_grid_reports_the_paper_lambda_beside_the_val_choice(text_zoo):
    rc = T.RunConfig(grid=(0.1, 0.3, 1.0), grid_on_test=True)
    res = T.run_row(text_zoo, T.Row("Task Arithmetic", "task_arithmetic", grid=T.TA_GRID), rc, {})
    val = dict(res.curves["val"])
    assert res.chosen["scaling"] == max(val, key=lambda lam: (val[lam], -lam))
    assert res.val and sum(res.val.values()) / len(res.val) == pytest.approx(val[res.chosen["scaling"]])
    assert res.paper["scaling"] == 0.3 and res.paper["val_mean"] == pytest.approx(val[0.3])
    test = dict(res.curves["test"])
    assert res.paper["test_mean"] == pytest.approx(test[0.3]) and res.mean == pytest.approx(test[res.chosen["scaling"]])


def test_awd_ta_scores_test_only_for_the_alpha_chosen_on_val(text_zoo, monkeypatch):
    splits = []
    predict = T.predict
    monkeypatch.setattr(T, "predict", lambda zoo, model, split: splits.append(split) or predict(zoo, model, split))
    rc = T.RunConfig(grid=(0.3, 0.6), grid_on_test=True, awd_alphas=(1e-2, 1e-4), awd_steps=1)
    res = T.run_row(text_zoo, T.Row("AWD-TA", "awd_ta", grid=T.AWD_SCALING_GRID), rc, {})
    assert splits.count("val") == 2 * 2  # each α: the λ grid (0.3, the paper's λ, is in it)
    assert splits.count("test") == 2 + 1  # chosen α only: the λ curve (the paper's λ 0.3 among it), the chosen λ
    test = dict(res.curves["test"])
    assert res.mean == pytest.approx(test[res.chosen["scaling"]]) and res.paper["test_mean"] == pytest.approx(test[0.3])


def test_adaptation_is_transductive_and_shows_its_evidence(text_zoo):
    rc = T.RunConfig(tta_steps=8, track_every=2, plateau_window=4, track_examples=8, tta_lr=0.05, stop_at_plateau=False)
    res = T.run_row(text_zoo, T.Row("TA+AdaRank", "adarank_ta", tta=True), rc, {})
    a = res.adaptation
    assert a["steps"] == 8 and [r["step"] for r in a["track"]] == [0, 2, 4, 6, 8] and len(a["batch_loss"]) == 8
    # before: the merge at its initial λ = 0.3 on every test input of every task
    start = T.predict(text_zoo, T._merge(text_zoo, "adarank_ta").fuse(), "test")
    assert a["entropy_before"] == pytest.approx({k: float(v["entropy"].mean()) for k, v in start.items()})
    assert a["accuracy_before"] == pytest.approx({k: float(v["correct"].mean()) for k, v in start.items()})
    tracked = T.predict(text_zoo, T._merge(text_zoo, "adarank_ta").fuse(), "test", 8)  # the library's eval, by hand
    assert a["track"][0]["accuracy"] == pytest.approx(sum(float(v["correct"].mean()) for v in tracked.values()) / 2)
    # after: the reported model, on all test inputs
    assert set(a["entropy_after"]) == set(text_zoo.names) and a["entropy_after"] != a["entropy_before"]
    assert a["lambda_before"]["min"] == pytest.approx(0.3) and a["lambda_before"]["max"] == pytest.approx(0.3)
    assert a["lambda_change"]["max_abs"] > 0.05  # lr 0.05 for 8 steps: λ moved
    f = a["mask_flips"]
    assert f["kept_before"] == f["total"]  # TA+AdaRank starts with every component on
    assert f["kept_after"] == f["kept_before"] - f["on_to_off"] + f["off_to_on"]
    assert a["converged"] == (a["plateau_step"] is not None)


def test_adaptation_uses_only_the_test_inputs(text_zoo, monkeypatch):
    seen = []
    import mergemodules

    real = mergemodules.adapt

    def spy(merged, tasks, **kw):
        for name, task in tasks.items():
            seen.append((name, torch.cat([b[0] for b in task.data])))
        return real(merged, tasks, **kw)

    monkeypatch.setattr(mergemodules, "adapt", spy)
    T.run_row(text_zoo, T.Row("CART++", "cart_pp", tta=True), T.RunConfig(tta_steps=2, track_examples=4), {})
    assert sorted(name for name, _ in seen) == sorted(text_zoo.names)
    for name, x in seen:
        t = next(t for t in text_zoo.tasks if t.name == name)
        assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, t.x["test"].tolist()))  # inputs only, all of them


def test_entropy_curve_is_the_windowed_batch_entropy(text_zoo):
    rc = T.RunConfig(tta_steps=6, track_every=3, plateau_window=3, track_examples=8, plateau_rel=1.0, plateau_tol=1.0,
                     stop_at_plateau=False)
    a = T.run_row(text_zoo, T.Row("AdaMerging (task-wise)", "adamerging_taskwise", tta=True), rc, {}).adaptation
    loss = a["batch_loss"]
    assert [r["step"] for r in a["track"]] == [0, 3, 6]
    assert a["track"][0]["entropy"] == pytest.approx(sum(a["entropy_before"].values()))
    assert a["track"][1]["entropy"] == pytest.approx(sum(loss[:3]) / 3, rel=1e-4)
    assert a["track"][2]["entropy"] == pytest.approx(sum(loss[3:]) / 3, rel=1e-4)
    assert a["converged"] and a["plateau_step"] == 3  # a lax rule holds at the first window


def test_run_config_rejects_bad_values():
    with pytest.raises(ValueError, match="RunConfig.tta_steps"):
        T.RunConfig(tta_steps=0)
    with pytest.raises(ValueError, match="plateau_window"):
        T.RunConfig(track_every=30, plateau_window=100)
    with pytest.raises(ValueError, match="unknown row"):
        T.RunConfig(rows=("CART", "Cart++"))


def test_a_row_subset_runs_the_rows_its_initial_lambda_comes_from(text_zoo):
    results = T.run_all(text_zoo, T.RunConfig(rows=("CART+AdaRank",), grid=(0.5,), tta_steps=1, track_examples=4))
    assert [r.label for r in results] == ["CART", "CART+AdaRank"]
    assert results[1].chosen["scaling_init"] == results[0].chosen["scaling"] == 0.5
    assert all(isinstance(v, np.ndarray) for v in results[1].correct.values())


def test_awd_adamerging_takes_awd_ta_alpha_and_never_falls_back_to_a_grid_value(text_zoo):
    rc = T.RunConfig(rows=("AWD-AdaMerging",), awd_alphas=(1e-2, 1e-4), awd_steps=1, grid=(0.5,), tta_steps=1,
                     track_examples=4)
    results = T.run_all(text_zoo, rc, cache=False)
    assert [r.label for r in results] == ["AWD-TA", "AWD-AdaMerging"]
    assert results[1].chosen["alpha"] == results[0].chosen["alpha"]
    row = next(r for r in T.ROWS if r.label == "AWD-AdaMerging")
    with pytest.raises(ValueError, match="AWD-AdaMerging: its α comes from the AWD-TA row"):
        T.run_row(text_zoo, row, rc, {})
    assert T._handed_alpha(row, dataclasses.replace(rc, awd_alphas=(1e-3,)), {}) == 1e-3  # one value: no choice
    cart_adarank = next(r for r in T.ROWS if r.label == "CART+AdaRank")
    with pytest.raises(ValueError, match="CART\\+AdaRank: its initial λ comes from the CART row; run that row too"):
        T.run_row(text_zoo, cart_adarank, rc, {})


def test_a_row_subset_takes_the_choices_of_rows_not_run_from_given(text_zoo):
    rc = T.RunConfig(rows=("CART+AdaRank", "AWD-AdaMerging"), awd_alphas=(1e-2, 1e-4), awd_steps=1, tta_steps=1,
                     track_examples=4)
    given = {"CART": {"scaling": 0.7}, "AWD-TA": {"alpha": 1e-4, "scaling": 0.3}}
    results = T.run_all(text_zoo, rc, cache=False, given=given)
    assert [r.label for r in results] == ["CART+AdaRank", "AWD-AdaMerging"]
    assert results[0].chosen["scaling_init"] == 0.7 and results[1].chosen["alpha"] == 1e-4


def test_adarank_rows_take_their_own_rate(text_zoo):
    rc = T.RunConfig(tta_steps=1, track_every=1, plateau_window=1, track_examples=4, tta_lr=1e-3, adarank_lr=5e-5)
    ada = T.run_row(text_zoo, T.Row("TA+AdaRank", "adarank_ta", tta=True), rc, {})
    lw = T.run_row(text_zoo, T.Row("AdaMerging (layer-wise)", "adamerging_layerwise", tta=True), rc, {})
    assert ada.adaptation["lr"] == 5e-5 and lw.adaptation["lr"] == 1e-3
    # one Adam step moves every λ by about lr
    assert ada.adaptation["lambda_change"]["max_abs"] == pytest.approx(5e-5, rel=0.05)
    assert lw.adaptation["lambda_change"]["max_abs"] == pytest.approx(1e-3, rel=0.05)


def test_adaptation_in_chunks_is_one_run_and_stops_at_the_plateau(text_zoo, monkeypatch):
    from benchmarks.accuracy import stats

    rc = T.RunConfig(tta_steps=8, track_every=2, plateau_window=4, track_examples=8, tta_lr=0.05, stop_at_plateau=False)
    row = T.Row("TA+AdaRank", "adarank_ta", tta=True)
    whole = T.run_row(text_zoo, row, rc, {})
    monkeypatch.setattr(stats, "plateau_step", lambda *args, **kwargs: None)
    chunked = T.run_row(text_zoo, row, dataclasses.replace(rc, stop_at_plateau=True), {})  # steps 1-4, then 5-8
    assert chunked.adaptation["batch_loss"] == whole.adaptation["batch_loss"] and chunked.test == whole.test
    assert chunked.adaptation["lambda_after"] == whole.adaptation["lambda_after"]
    monkeypatch.setattr(stats, "plateau_step", lambda curve, *args, **kwargs: curve[-1][0])  # plateau at once
    stopped = T.run_row(text_zoo, row, dataclasses.replace(rc, stop_at_plateau=True), {})
    a = stopped.adaptation
    assert (a["steps"], a["budget"], a["plateau_step"], a["converged"]) == (4, 8, 4, True)
    assert a["batch_loss"] == whole.adaptation["batch_loss"][:4]


def test_a_row_killed_mid_adaptation_resumes_from_its_scratch_checkpoint(text_zoo, tmp_path, monkeypatch):
    import mergemodules
    from benchmarks.accuracy import stats

    rc = T.RunConfig(tta_steps=8, track_every=2, plateau_window=4, track_examples=8, tta_lr=0.05)
    row = T.Row("TA+AdaRank", "adarank_ta", tta=True)
    monkeypatch.setattr(stats, "plateau_step", lambda *args, **kwargs: None)  # run the whole budget, in 2 chunks
    whole = T.run_row(text_zoo, row, rc, {})
    real_adapt, calls = mergemodules.adapt, []

    def killed_in_the_second_chunk(*args, **kwargs):
        calls.append(kwargs["steps"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_adapt(*args, **kwargs)

    monkeypatch.setattr(mergemodules, "adapt", killed_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        T.run_row(text_zoo, row, rc, {}, scratch=tmp_path)
    assert calls == [4, 8] and (tmp_path / "adapt.pt").is_file()
    monkeypatch.setattr(mergemodules, "adapt", real_adapt)
    monkeypatch.setattr(T.tempfile, "TemporaryDirectory", None)  # a kept checkpoint needs no scratch folder
    resumed = T.run_row(text_zoo, row, rc, {}, scratch=tmp_path)
    a = resumed.adaptation
    assert a["resumed_at_step"] == 4 and whole.adaptation["resumed_at_step"] is None
    assert a["batch_loss"] == whole.adaptation["batch_loss"] and a["track"] == whole.adaptation["track"]
    assert resumed.test == whole.test and a["lambda_after"] == whole.adaptation["lambda_after"]
    # an unreadable checkpoint (cut short) is removed and the row starts over, with the same numbers
    (tmp_path / "adapt.pt").write_bytes(b"cut")
    again = T.run_row(text_zoo, row, rc, {}, scratch=tmp_path)
    assert again.adaptation["resumed_at_step"] is None and again.test == whole.test
