"""LAPACK's ``dsyevr`` for the top eigenpairs of a symmetric matrix, called without holding the GIL.

``scipy.linalg.eigh(..., driver="evr")`` runs the same routine but holds the GIL while it does, so
tasks decomposed side by side on threads (:mod:`mergemodules.decompose`) would run one at a time.
Here scipy's own ``dsyevr`` (the function pointer ``scipy.linalg.cython_lapack`` exports) is called
through :mod:`ctypes`, which releases the GIL for the call. Same routine, arguments and workspace as
scipy's call, so the same values bit for bit (``tests/test_lapack.py``).
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from scipy.linalg import cython_lapack

__all__ = ["top_eigenpairs"]


@functools.cache
def _dsyevr() -> ctypes._CFuncPtr:
    """The C function behind ``scipy.linalg.cython_lapack.dsyevr``: 21 pointer arguments, no result."""
    capsule = cython_lapack.__pyx_capi__["dsyevr"]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 21)(address)  # CFUNCTYPE: the GIL is released


def _int(value: int = 0) -> np.ndarray:
    return np.array([value], dtype=np.intc)


def top_eigenpairs(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (ascending) and their eigenvectors (columns) of the symmetric float64 ``G``.

    Reads the lower triangle of ``G`` (as ``scipy.linalg.eigh`` does) and leaves ``G`` unchanged.
    """
    n = G.shape[0]
    if G.dtype != np.float64 or G.shape != (n, n):
        raise ValueError(f"G must be a square float64 matrix, got {G.dtype} {G.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    a = np.array(G, dtype=np.float64, order="F")  # overwritten by the reduction
    w, z = np.empty(n), np.empty((k, n))  # z: the n × k eigenvectors in column-major order
    isuppz, found, info = np.empty(2 * k, dtype=np.intc), _int(), _int()
    bound, abstol = np.zeros(1), np.zeros(1)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        arrays = (b"V", b"I", b"L", _int(n), a, _int(n), bound, bound, _int(n - k + 1), _int(n), abstol, found,
                  w, z, _int(n), isuppz, work, _int(lwork), iwork, _int(liwork), info)
        _dsyevr()(*[ctypes.c_char_p(x) if isinstance(x, bytes) else x.ctypes.data for x in arrays])
        if info[0] != 0:
            raise np.linalg.LinAlgError(f"LAPACK dsyevr failed (info={info[0]}) on a {n}×{n} matrix")

    work, iwork = np.empty(1), np.empty(1, dtype=np.intc)
    call(work, -1, iwork, -1)  # workspace query: the sizes scipy's call uses
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.intc), liwork)
    return w[:k].copy(), z.T.copy()
