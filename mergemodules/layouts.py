"""How a parameter is seen as the 2-D (out, in) matrix its task vectors are decomposed as.

A :class:`Layout` converts a parameter-shaped tensor to that matrix (:meth:`Layout.to_matrix`) and
back (:meth:`Layout.from_matrix`). Its value is the name stored in merge-state files and accepted by
the ``matrices`` option, and a layout compares equal to that name (``Layout.IN_OUT == "in_out"``).
Which parameters get which layout is decided in ``targets.py``.
"""
from __future__ import annotations

import enum
import math
from typing import Sequence

from torch import Tensor

__all__ = ["Layout", "parse_layout"]


class Layout(str, enum.Enum):
    """The view of a parameter as an (out, in) matrix."""

    OUT_IN = "out_in"  # stored (out, in): nn.Linear, attention in-projections
    IN_OUT = "in_out"  # stored (in, out): Hugging Face Conv1D, open_clip's proj
    OUT_IN_KERNEL = "out_in_kernel"  # stored (out, in, *kernel), seen as (out, in·∏kernel): convolutions

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:
        return str.__hash__(self)  # equal to its name, so hashed as its name

    def fits(self, ndim: int) -> bool:
        """Whether a parameter with ``ndim`` dimensions can be laid out this way."""
        return ndim >= 3 if self is Layout.OUT_IN_KERNEL else ndim == 2

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The (out, in) shape of the matrix of a parameter of ``shape``."""
        self._check_ndim(len(shape))
        if self is Layout.IN_OUT:
            return shape[1], shape[0]
        return shape[0], math.prod(shape[1:])

    def to_matrix(self, tensor: Tensor, batch: int = 0) -> Tensor:
        """The (…, out, in) matrix of a parameter-shaped tensor with ``batch`` leading dimensions (a view)."""
        lead, shape = tensor.shape[:batch], tensor.shape[batch:]
        out, inp = self.matrix_shape(shape)
        if self is Layout.OUT_IN:
            return tensor
        if self is Layout.IN_OUT:
            return tensor.transpose(-2, -1)
        return tensor.reshape(*lead, out, inp)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """The parameter-shaped tensor of a (…, out, in) ``matrix``; ``shape`` may be left out for 2-D layouts."""
        if shape is None:
            if self is Layout.OUT_IN_KERNEL:
                raise ValueError("shape: the out_in_kernel layout needs the parameter's shape")
            shape = tuple(matrix.shape[-2:]) if self is Layout.OUT_IN else tuple(matrix.shape[-2:])[::-1]
        expected = self.matrix_shape(shape)
        if matrix.dim() < 2 or tuple(matrix.shape[-2:]) != expected:
            raise ValueError(f"a {tuple(shape)} parameter in layout {self.value} needs an {expected} matrix, "
                             f"got shape {tuple(matrix.shape)}")
        if self is Layout.OUT_IN:
            return matrix
        if self is Layout.IN_OUT:
            return matrix.transpose(-2, -1)
        return matrix.reshape(*matrix.shape[:-2], *shape)

    def _check_ndim(self, ndim: int) -> None:
        if not self.fits(ndim):
            needs = "at least 3" if self is Layout.OUT_IN_KERNEL else "2"
            raise ValueError(f"layout {self.value} needs a parameter with {needs} dimensions, got {ndim}")


def parse_layout(value: str | Layout, option: str) -> Layout:
    """``value`` as a :class:`Layout`; a ValueError naming ``option`` if it is none."""
    try:
        return Layout(value)
    except ValueError:
        names = ", ".join(repr(layout.value) for layout in Layout)
        raise ValueError(f"{option}={value!r}: layout must be one of {names}") from None
