"""The benchmark's tests run torch on one thread: on a shared 2-core machine, spinning threads were ~10× slower."""
import os

import pytest
import torch

os.environ.setdefault("MERGEMODULES_BENCH_QUIET", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def text_zoo(tmp_path_factory):
    """The tiny text zoo (tiny.py), built once per test session."""
    from benchmarks.accuracy import zoo as Z
    from tiny import text_available, tiny_text_config

    if not text_available():
        pytest.skip("Debian text data not installed (run .ci/install-data.sh)")
    return Z.build_zoo(tiny_text_config(), str(tmp_path_factory.mktemp("zoo")))
