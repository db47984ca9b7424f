"""An example of your own task and suite for the accuracy benchmark (``--tasks-from``): copy and edit.

    python -m benchmarks.accuracy --tasks-from benchmarks/accuracy/examples/my_tasks.py --suite fortune_pair

The task: an English fortune cookie -> which of two Debian ``fortunes`` files it comes from ("love" or
"food"). The head rule is the suite's ``head_init``: "zeroshot" makes each class's head row from the
embedding of its description (here the class names), fixed before fine-tuning and frozen. The backbone is
the suite's ``text_model`` (here the tiny random BERT the tests use; ``TextModelSpec("minilm")`` is the
real pretrained all-MiniLM-L6-v2).
"""
import os

from benchmarks.accuracy import data, plugins
from benchmarks.accuracy.models import TextModelSpec
from benchmarks.accuracy.table import RunConfig
from benchmarks.accuracy.zoo import FinetuneHP, SuiteConfig

CLASSES = ["love", "food"]


def fortune_pair(sizes: data.Sizes, seed: int) -> data.TaskData:
    """Your data and labels: (input, class index) pairs; the benchmark splits them (seeded, class-balanced)."""
    items = [(text, c) for c, name in enumerate(CLASSES)
             for text in data.read_fortunes(os.path.join(data.FORTUNE_DIR, name))]
    return plugins.task_from_items("fortune_pair", "text", "Debian fortunes: love or food", items, CLASSES, sizes, seed)


def suite(full: bool) -> tuple[SuiteConfig, RunConfig]:
    """Your suite (your task beside a built-in one; merging needs ≥ 2): tasks, split sizes, the fine-tuning recipe with its head rule, the backbone, the run budget."""
    cfg = SuiteConfig("text", ("fortune_pair", "foldoc"), data.Sizes(train=48, val=24, tta=0, test=48),
                      FinetuneHP(6, 16, 2e-3, head_init="zeroshot"), max_len=24,
                      text_model=TextModelSpec("tiny", hidden=16, layers=1, heads=2))
    return cfg, RunConfig(tta_steps=100 if full else 4, track_every=2, plateau_window=4, track_examples=16,
                          awd_steps=3, cart_ranks=(0.08, 1.0))


plugins.register_task("fortune_pair", fortune_pair, kind="text")
plugins.register_suite("fortune_pair", suite)
