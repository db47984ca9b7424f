import ctypes
import threading
import time

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from mergemodules import lapack
from mergemodules.lapack import top_eigenpairs


def _gram(n: int, seed: int, rows: int | None = None) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((rows or n + 3, n)) * np.arange(1, n + 1) ** -0.5
    return A.T @ A


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 80), data=st.data(), seed=st.integers(0, 10**6))
def test_equals_scipys_evr_bit_for_bit_and_leaves_the_input(n, data, seed):
    k = data.draw(st.integers(1, n))
    G = _gram(n, seed)
    before = G.copy()
    w, v = top_eigenpairs(G, k)
    w_ref, v_ref = scipy.linalg.eigh(G, subset_by_index=(n - k, n - 1), driver="evr")
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(G, before)


def test_reads_the_lower_triangle_as_scipy_does():
    G = _gram(40, 0)
    G[np.triu_indices(40, 1)] = 7.0  # garbage above the diagonal
    w, v = top_eigenpairs(G, 5)
    w_ref, v_ref = scipy.linalg.eigh(G, subset_by_index=(35, 39), driver="evr", lower=True)
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(v, v_ref)


def test_a_large_matrix_of_rank_below_k():
    A = np.random.default_rng(1).standard_normal((300, 4))
    G = A @ A.T  # rank 4, a cluster of 296 zero eigenvalues
    w, v = top_eigenpairs(G, 10)
    np.testing.assert_allclose(w[-4:], np.linalg.eigvalsh(A.T @ A), rtol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(10), atol=1e-12)


@pytest.mark.parametrize("G, k, match", [
    (np.eye(3, dtype=np.float32), 1, "float64"),
    (np.zeros((3, 4)), 1, "square"),
    (np.eye(3), 0, "k=0"),
    (np.eye(3), 4, "k=4"),
])
def test_bad_input_is_an_error(G, k, match):
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(G, k)


def _longest_stall_while(call) -> tuple[float, float]:
    """The longest time this thread could not run while ``call`` ran on another thread, and the call's duration.

    A call that holds the GIL stalls this thread for about its whole duration; one that releases it, for a
    switch interval or a scheduler tick, whatever the machine's load.
    """
    done, took = threading.Event(), [0.0]

    def worker():
        start = time.perf_counter()
        call()
        took[0] = time.perf_counter() - start
        done.set()

    thread = threading.Thread(target=worker)
    last, stall = time.perf_counter(), 0.0  # from before the start: a wait for the GIL anywhere below counts
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    thread.join()
    return stall, took[0]


def test_the_call_releases_the_gil(monkeypatch):
    """Another thread runs while LAPACK works. The control calls the same routine through ``PYFUNCTYPE``, which
    holds the GIL: it stalls the other thread for most of the call, so the measure can tell the two apart."""
    G = _gram(1500, 2)  # ≈ 0.5 s of LAPACK: long against a scheduler tick
    stall, took = _longest_stall_while(lambda: top_eigenpairs(G, 100))
    assert stall < 0.5 * took, (stall, took)

    address = ctypes.cast(lapack._dsyevr(), ctypes.c_void_p).value
    holding_the_gil = ctypes.PYFUNCTYPE(None, *[ctypes.c_void_p] * 21)(address)
    monkeypatch.setattr(lapack, "_dsyevr", lambda: holding_the_gil)
    stall, took = _longest_stall_while(lambda: top_eigenpairs(G, 100))
    assert stall > 0.5 * took, (stall, took)
