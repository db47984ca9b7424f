"""A tiny text configuration of the benchmark on real data (Debian fortunes and FOLDOC) for the tests."""
from __future__ import annotations

from benchmarks.accuracy import data as D
from benchmarks.accuracy import models as M
from benchmarks.accuracy import zoo as Z

# Text data comes from Debian packages that .ci/install-data.sh installs.
TEXT_TASKS = ("fortune_lang", "foldoc")


def text_available() -> bool:
    """Whether the Debian packages behind TEXT_TASKS are installed."""
    try:
        for name in TEXT_TASKS:
            D.load_task(name, D.Sizes(8, 4, 4, 8), 0)
    except D.DataUnavailable:
        return False
    return True


def tiny_text_config(**kw) -> Z.SuiteConfig:
    """Two text tasks, a tiny random BERT, a few fine-tuning steps."""
    return Z.SuiteConfig("text", TEXT_TASKS, D.Sizes(48, 24, 16, 48), Z.FinetuneHP(6, 16, 2e-3, head_init="zeroshot"),
                         max_len=24, text_model=M.TextModelSpec("tiny", hidden=16, layers=1, heads=2), **kw)
