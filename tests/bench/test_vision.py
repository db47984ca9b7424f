"""The vision suite: image tasks, the DINOv2 encoder wrapper, a tiny vision zoo under the frozen-probe protocol."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks.accuracy import data as D
from benchmarks.accuracy import models as M
from benchmarks.accuracy import table as T
from benchmarks.accuracy import zoo as Z

TASKS = ("digits", "oxygen")


def tiny_vision_config(**kw) -> Z.SuiteConfig:
    return Z.SuiteConfig("vision", TASKS, D.Sizes(48, 24, 0, 48), Z.FinetuneHP(4, 16, 1e-3, head_init="probe"),
                         vision_model=M.VisionModelSpec("tiny", image_size=28, hidden=16, layers=1, heads=2), **kw)


@pytest.fixture(scope="module")
def vision_zoo(tmp_path_factory):
    if not os.path.isdir(D.OXYGEN_DIR):
        pytest.skip("Debian oxygen-icon-theme not installed (run .ci/install-data.sh)")
    return Z.build_zoo(tiny_vision_config(), str(tmp_path_factory.mktemp("zoo")))


def test_oxygen_task_colour_icons_by_context():
    a = D.load_task("oxygen", D.Sizes(100, 30, 0, 60), seed=1) if os.path.isdir(D.OXYGEN_DIR) else pytest.skip("no oxygen")
    assert a.classes == list(D.OXYGEN_CONTEXTS) and a.train.x.shape == (len(a.train), 3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert len(a.test) >= 60 and len(a.val) >= 30 and len(a.tta) == 0
    x = a.train.x
    assert x.min() >= 0.0 and x.max() <= 1.0 and np.abs(x[:, 0] - x[:, 1]).max() > 0.2  # colour, not gray
    assert set(np.unique(a.test.y)) == set(range(len(D.OXYGEN_CONTEXTS)))  # every context is tested
    assert a.fingerprint() == D.load_task("oxygen", D.Sizes(100, 30, 0, 60), seed=1).fingerprint()


def test_vision_encoder_resizes_and_normalises():
    enc = M.build_vision_encoder(M.VisionModelSpec("tiny", image_size=42, hidden=16, layers=1, heads=2))
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        got = enc(x)
        up = torch.nn.functional.interpolate(x, size=(42, 42), mode="bilinear", align_corners=False)
        mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
        want = enc.dino(pixel_values=(up - mean) / std).pooler_output
    assert got.shape == (3, 16) and M.feature_dim(enc) == 16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown vision model kind 'vit'"):
        M.build_vision_encoder(M.VisionModelSpec("vit"))


def test_heads_are_linear_probes_fixed_before_fine_tuning(vision_zoo):
    for ti, t in enumerate(vision_zoo.tasks):
        feats = Z.encode(vision_zoo.pretrained, t.x["train"], 64)
        probe = Z.linear_probe(feats, t.y["train"], len(t.data.classes), 1.0, seed=ti)
        torch.testing.assert_close(t.head.weight, probe.weight, atol=0, rtol=0)  # the frozen head, unchanged
        torch.testing.assert_close(t.head.bias, probe.bias, atol=0, rtol=0)
        moved = [n for (n, p), q in zip(t.encoder.named_parameters(), vision_zoo.pretrained.parameters())
                 if not torch.equal(p, q)]
        assert "dino.encoder.layer.0.mlp.fc1.weight" in moved  # the task vector lives in the encoder
        e = t.entry
        assert e["hparams"]["head"] == "frozen" and e["adaptation_inputs"] == "test inputs (transductive)"
        assert e["sizes"]["tta"] == 0 and e["sizes"]["test"] >= 48
        assert e["zero_shot_accuracy"]["test"] == pytest.approx(Z.accuracy(vision_zoo.pretrained, t.head, t.x["test"],
                                                                           t.y["test"], 64))
        assert t.x["train"].shape[1:] == (3, D.IMAGE_SIZE, D.IMAGE_SIZE)


def test_vision_zoo_reuse_and_source_change(vision_zoo, monkeypatch, caplog):
    cache = os.path.dirname(vision_zoo.directory)
    assert Z.build_zoo(tiny_vision_config(), cache).rebuilt == []
    real = Z._pretrained_source

    def changed(cfg):
        return {**real(cfg), "source_sha256": "0" * 64}

    monkeypatch.setattr(Z, "_pretrained_source", changed)
    with caplog.at_level("WARNING"):
        again = Z.build_zoo(tiny_vision_config(), cache)
    assert again.rebuilt == ["pretrained", *TASKS] and "source file changed" in caplog.text
    manifest = json.load(open(os.path.join(again.directory, "manifest.json")))
    assert manifest["pretrained"]["source_sha256"] == "0" * 64


def test_a_merge_of_the_vision_zoo(vision_zoo):
    res = T.run_row(vision_zoo, T.Row("Task Arithmetic", "task_arithmetic", grid=(0.3, 1.0)), T.RunConfig(), {})
    assert res.status == "ok" and res.chosen["scaling"] in (0.3, 1.0) and set(res.test) == set(TASKS)


def test_finetune_warms_up_and_never_moves_the_head(monkeypatch):
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    w0, h0 = enc.weight.detach().clone(), head.weight.detach().clone()
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    Z.finetune(enc, head, x, y, Z.FinetuneHP(steps=1, batch_size=8, lr=0.3, warmup=0.0), seed=0, desc="t")
    assert torch.equal(head.weight, h0) and not head.weight.requires_grad
    # Adam's first step moves every weight by ~lr whatever its gradient: why the warm-up exists
    torch.testing.assert_close((enc.weight - w0).abs(), torch.full((4, 4), 0.3), atol=1e-3, rtol=0)
    lrs, real_step = [], torch.optim.AdamW.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    Z.finetune(enc, head, x, y, Z.FinetuneHP(steps=10, batch_size=8, lr=0.3, warmup=0.2), seed=0, desc="t")
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3 * 7 / 8, 0.3 * 6 / 8, 0.3 * 5 / 8, 0.3 * 4 / 8, 0.3 * 3 / 8,
                                 0.3 * 2 / 8, 0.3 / 8])
