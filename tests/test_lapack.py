import threading

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _progress_while(call) -> int:
    """How often the main thread counts while ``call`` runs on another thread: ~0 if ``call`` holds the GIL."""
    inside, done, count = threading.Event(), threading.Event(), [0, 0]

    def worker():
        inside.set()
        start = count[0]
        call()
        count[1] = count[0] - start
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait()
    while not done.is_set():
        count[0] += 1
    thread.join()
    return count[1]


def test_the_call_releases_the_gil():
    """Another thread runs while LAPACK works; scipy's call of the same routine holds the GIL (it counts only
    during scipy's Python-level checks and copies, O(n²) against LAPACK's O(n³))."""
    G = _gram(1000, 2)
    with_scipy = _progress_while(lambda: scipy.linalg.eigh(G, subset_by_index=(900, 999), driver="evr"))
    ours = _progress_while(lambda: top_eigenpairs(G, 100))
    assert ours > 4 * with_scipy, (ours, with_scipy)
