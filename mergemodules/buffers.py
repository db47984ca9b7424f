"""A reused buffer for temporaries of the same role, tensor after tensor (fresh memory costs a page fault per page)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Workspace"]


class Workspace:
    """One byte buffer that holds a temporary of each tensor in turn (any dtype), for a caller that is done with one
    tensor's temporary before it asks for the next: the stacked values of a static export, a cast's scratch."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised ``shape`` tensor in the buffer: whatever an earlier one held there is overwritten."""
        nbytes = math.prod(shape) * dtype.itemsize
        device = torch.device(device)
        if self.buffer is None or self.buffer.device != device or self.buffer.numel() < nbytes:
            self.buffer = None  # freed first: the old and the new buffer are never held together
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.buffer[:nbytes].view(dtype).view(shape)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lies in the buffer (and would be overwritten by the next temporary)."""
        buffer = self.buffer
        return buffer is not None and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
