"""The benchmark's tests run torch on one thread: on a shared 2-core machine, spinning threads were ~10× slower."""
import os

import torch

os.environ.setdefault("MERGEMODULES_BENCH_QUIET", "1")
torch.set_num_threads(1)
