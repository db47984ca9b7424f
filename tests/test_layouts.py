"""Layouts: a parameter seen as its (out, in) matrix and back."""
import pytest
import torch

from mergemodules.layouts import Layout, parse_layout


@pytest.mark.parametrize(
    "layout, shape, matrix",
    [
        (Layout.OUT_IN, (4, 3), (4, 3)),
        (Layout.IN_OUT, (3, 4), (4, 3)),
        (Layout.OUT_IN_KERNEL, (4, 3, 2, 5), (4, 30)),
        (Layout.OUT_IN_KERNEL, (4, 3, 7), (4, 21)),
    ],
)
def test_to_matrix_and_back_with_leading_task_dimension(layout, shape, matrix):
    tensor = torch.randn(2, *shape)
    as_matrix = layout.to_matrix(tensor, batch=1)
    assert layout.matrix_shape(shape) == matrix and as_matrix.shape == (2, *matrix)
    assert torch.equal(layout.from_matrix(as_matrix, shape), tensor)
    assert torch.equal(layout.to_matrix(tensor[1]), as_matrix[1])


def test_rows_of_the_matrix_are_output_channels():
    kernel = torch.randn(4, 3, 2, 2)
    assert torch.equal(Layout.OUT_IN_KERNEL.to_matrix(kernel)[2], kernel[2].flatten())
    table = torch.randn(3, 4)  # stored (in, out): output j is column j
    assert torch.equal(Layout.IN_OUT.to_matrix(table)[1], table[:, 1])


def test_two_d_layouts_need_no_shape_to_come_back():
    matrix = torch.randn(4, 3)
    assert torch.equal(Layout.OUT_IN.from_matrix(matrix), matrix)
    assert torch.equal(Layout.IN_OUT.from_matrix(matrix), matrix.t())
    with pytest.raises(ValueError, match="shape: the out_in_kernel layout needs the parameter's shape"):
        Layout.OUT_IN_KERNEL.from_matrix(matrix)


def test_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match=r"layout out_in_kernel needs a parameter with at least 3 dimensions, got 2"):
        Layout.OUT_IN_KERNEL.matrix_shape((4, 3))
    with pytest.raises(ValueError, match=r"layout in_out needs a parameter with 2 dimensions, got 4"):
        Layout.IN_OUT.to_matrix(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\) parameter in layout out_in_kernel needs an \(4, 12\) matrix"):
        Layout.OUT_IN_KERNEL.from_matrix(torch.randn(4, 11), (4, 3, 2, 2))
    assert [Layout.OUT_IN_KERNEL.fits(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert [Layout.OUT_IN.fits(n) for n in (1, 2, 3)] == [False, True, False]


def test_a_layout_is_its_name():
    assert Layout.IN_OUT == "in_out" and str(Layout.OUT_IN_KERNEL) == "out_in_kernel"
    assert f"{Layout.OUT_IN}" == "out_in" and "out_in" in {Layout.OUT_IN}
    assert parse_layout("in_out", "matrices['x']") is Layout.IN_OUT
    with pytest.raises(ValueError, match=r"matrices\['x'\]='rows': layout must be one of 'out_in', 'in_out', 'out_in_kernel'"):
        parse_layout("rows", "matrices['x']")
