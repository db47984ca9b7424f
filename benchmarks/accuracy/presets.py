"""The benchmark's two budgets: the reduced default (< 15 min on 2 cores, zoo included) and ``--full``."""

from __future__ import annotations

import dataclasses

from .data import Sizes
from .models import TextModelSpec, VisionModelSpec
from .table import AWD_ALPHA_GRID, CART_RANKS, RunConfig
from .zoo import FinetuneHP, PretrainHP, SuiteConfig

DEFAULT_TEXT_TASKS = ("fortune_topic", "fortune_lang", "wordnet_noun", "foldoc")
FULL_TEXT_TASKS = ("fortune_topic", "fortune_lang", "wordnet_noun", "foldoc", "manpage", "wordnet_verb", "fortune_de")
VISION_TASKS = ("fashion_mnist", "mnist", "digits", "letters", "icons")


def get(suite: str, *, full: bool = False) -> tuple[SuiteConfig, RunConfig]:
    if suite == "text":
        if full:
            cfg = SuiteConfig("text", FULL_TEXT_TASKS, Sizes(train=2048, val=128, tta=128, test=500),
                              FinetuneHP(steps=200, batch_size=32, lr=1e-4, head_init="zeroshot"), max_len=64,
                              text_model=TextModelSpec("minilm"))
            rc = RunConfig(tta_steps=100, awd_steps=500, awd_alphas=AWD_ALPHA_GRID, cart_ranks=CART_RANKS)
        else:
            cfg = SuiteConfig("text", DEFAULT_TEXT_TASKS, Sizes(train=1024, val=64, tta=64, test=300),
                              FinetuneHP(steps=60, batch_size=32, lr=2e-4, head_init="zeroshot"), max_len=48,
                              text_model=TextModelSpec("minilm"))
            rc = RunConfig(tta_steps=20, awd_steps=100, cart_ranks=(0.02, 0.08, 0.32, 1.0))
        return cfg, rc
    if suite == "vision":
        if full:
            cfg = SuiteConfig("vision", VISION_TASKS, Sizes(train=3000, val=200, tta=128, test=1000),
                              FinetuneHP(steps=600, batch_size=64, lr=1e-3, weight_decay=0.01, head_init="prototype"),
                              vision_model=VisionModelSpec(width=128, layers=4, heads=4, patch_size=4, output_dim=128),
                              pretrain=PretrainHP(examples=40000, steps=1500, batch_size=128))
            rc = RunConfig(tta_steps=100, awd_steps=500, awd_alphas=AWD_ALPHA_GRID, cart_ranks=CART_RANKS)
        else:
            cfg = SuiteConfig("vision", VISION_TASKS, Sizes(train=1000, val=100, tta=64, test=500),
                              FinetuneHP(steps=300, batch_size=64, lr=1e-3, weight_decay=0.01, head_init="prototype"),
                              vision_model=VisionModelSpec(width=96, layers=3, heads=4, patch_size=7, output_dim=96),
                              pretrain=PretrainHP(examples=12000, steps=600, batch_size=128))
            rc = RunConfig(tta_steps=20, awd_steps=100, cart_ranks=(0.02, 0.08, 0.32, 1.0))
        return cfg, rc
    raise ValueError(f"unknown suite {suite!r}: 'text' or 'vision'")


def replace(obj, **kw):
    return dataclasses.replace(obj, **kw)
