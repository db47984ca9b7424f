import torch

from mergemodules.buffers import Workspace


def test_workspace_reuses_one_buffer_and_grows_it() -> None:
    workspace = Workspace()
    small = workspace.empty((2, 3), torch.float32, torch.device("cpu"))
    again = workspace.empty((3, 2), torch.float32, torch.device("cpu"))
    assert workspace.holds(small) and again.data_ptr() == small.data_ptr()
    larger = workspace.empty((4, 5), torch.float32, torch.device("cpu"))
    assert larger.shape == (4, 5) and workspace.holds(larger) and not workspace.holds(torch.zeros(3))


def test_workspace_serves_any_dtype_from_its_bytes() -> None:
    workspace = Workspace()
    floats = workspace.empty((8,), torch.float32)
    halves = workspace.empty((16,), torch.bfloat16)  # the same 32 bytes
    doubles = workspace.empty((5,), torch.float64)  # 40 bytes: a larger buffer
    assert halves.data_ptr() == floats.data_ptr() and halves.dtype == torch.bfloat16
    assert doubles.dtype == torch.float64 and workspace.holds(doubles) and not workspace.holds(floats)
    assert workspace.buffer.numel() == 40
