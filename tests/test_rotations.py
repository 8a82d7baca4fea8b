"""Property tests for so8lab.rotations against float64 references that share no code with it
(scipy.linalg.expm/logm, numpy eigenvalues, explicit index loops). Hypothesis settings come from conftest.py."""
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import assume, given, strategies as st
from hypothesis.extra.numpy import arrays

from so8lab.rotations import (canonical_angles, cayley, expm_so8, geodesic_distance, is_rotation, logm_so8,
                              orthogonality_error, random_rotation, skew_from_angles, skew_to_vec, vec_to_skew)

coordinates = arrays(np.float64, (28,), elements=st.floats(-1, 1, allow_nan=False, allow_infinity=False))
norms = st.sampled_from([0.0, 1e-8, 1e-3, 0.3, 1.0, 3.0, 10.0, 30.0])
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


def skew(v, norm):
    "Float64 skew matrix with coordinates along `v`, scaled to Frobenius norm `norm` (v = 0 gives 0)."
    A = vec_to_skew(torch.from_numpy(v))
    size = torch.linalg.matrix_norm(A)
    return A * (norm / size) if size > 0 else A


def reference_angles(R):
    "|arg| of numpy's eigenvalues, sorted descending, one per conjugate pair."
    return np.sort(np.abs(np.angle(np.linalg.eigvals(np.asarray(R, dtype=np.float64)))))[::-1][::2]


@given(coordinates)
def test_skew_layout_matches_an_explicit_loop(v):
    A = vec_to_skew(torch.from_numpy(v))
    expected = np.zeros((8, 8))
    for k, (i, j) in enumerate(itertools.combinations(range(8), 2)):
        expected[i, j], expected[j, i] = v[k], -v[k]
    np.testing.assert_array_equal(A.numpy(), expected)
    np.testing.assert_array_equal(skew_to_vec(A).numpy(), v)


@given(coordinates, norms)
def test_expm_matches_scipy_in_float64(v, norm):
    A = skew(v, norm)
    error = np.abs(expm_so8(A).numpy() - scipy.linalg.expm(A.numpy())).max()
    assert error < 1e-14 * max(1.0, norm)


@given(coordinates, norms, dtypes)
def test_expm_is_a_rotation(v, norm, dtype):
    R = expm_so8(skew(v, norm).to(dtype))
    assert orthogonality_error(R.double()).item() < (1e-6 if dtype == torch.float32 else 1e-13)
    assert abs(torch.linalg.det(R.double()).item() - 1) < (1e-5 if dtype == torch.float32 else 1e-13)
    assert is_rotation(R).item()


@given(coordinates, norms)
def test_cayley_is_a_rotation_and_matches_its_formula(v, norm):
    A = skew(v, norm)
    I = np.eye(8)
    expected = np.linalg.solve(I - A.numpy() / 2, I + A.numpy() / 2)
    np.testing.assert_allclose(cayley(A).numpy(), expected, atol=1e-13 * max(1.0, norm))
    assert orthogonality_error(cayley(A.float()).double()).item() < 1e-6


@given(coordinates, st.floats(1e-6, math.pi - 1e-3), dtypes)
def test_log_inverts_exp_below_the_cut_locus(v, largest_angle, dtype):
    assume(np.abs(v).max() > 1e-3)
    A = skew(v, 1.0)
    A = A * (largest_angle / np.abs(np.linalg.eigvals(A.numpy()).imag).max())   # largest canonical angle = largest_angle
    L = logm_so8(expm_so8(A.to(dtype))).double()
    eps = torch.finfo(dtype).eps   # the log's condition number grows like 1/(π − θ) near the cut locus
    assert np.abs(L.numpy() - A.numpy()).max() < (1e-12 if dtype == torch.float64 else 1e-5) + 50 * eps / (math.pi - largest_angle)


@given(seeds, dtypes)
def test_exp_inverts_log_on_haar_rotations(seed, dtype):
    R = random_rotation(16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    L = logm_so8(R.to(dtype))
    assert (L + L.mT).abs().max().item() == 0
    error = (expm_so8(L).double() - R).abs().max().item()
    assert error < (1e-13 if dtype == torch.float64 else 1e-4)   # float32: half-turn rounding within ~3e-5 of π
    if dtype == torch.float64:                                   # scipy's logm is slow: two matrices per example
        np.testing.assert_allclose(L[:2].numpy(), np.stack([scipy.linalg.logm(r).real for r in R[:2].numpy()]), atol=1e-9)


@given(seeds, dtypes)
def test_canonical_angles_match_numpy(seed, dtype):
    R = random_rotation(16, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    expected = np.stack([reference_angles(r) for r in R.double().numpy()])
    np.testing.assert_allclose(canonical_angles(R).double().numpy(), expected, atol=1e-13 if dtype == torch.float64 else 2e-6)


@given(arrays(np.float64, (4,), elements=st.sampled_from([0.0, 1e-9, 1e-4, 0.5, math.pi / 2, 2.0, math.pi - 1e-6, math.pi])),
       seeds)
def test_canonical_angles_of_constructed_rotations(angles, seed):
    frame = random_rotation(generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    R = expm_so8(skew_from_angles(torch.from_numpy(angles), frame))
    np.testing.assert_allclose(canonical_angles(R).numpy(), np.sort(angles)[::-1], atol=1e-13)
    assert (expm_so8(logm_so8(R)) - R).abs().max().item() < 1e-12


@given(seeds)
def test_geodesic_distance_is_an_invariant_metric(seed):
    g = torch.Generator().manual_seed(seed)
    R1, R2, R3, Q = (random_rotation(8, generator=g, dtype=torch.float64) for _ in range(4))
    d12 = geodesic_distance(R1, R2)
    expected = [np.linalg.norm(scipy.linalg.logm(a.T @ b)) / math.sqrt(2) for a, b in zip(R1[:2].numpy(), R2[:2].numpy())]
    np.testing.assert_allclose(d12[:2].numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(geodesic_distance(R2, R1).numpy(), d12.numpy(), atol=1e-12)
    assert geodesic_distance(R1, R1).abs().max().item() < 1e-12
    assert (geodesic_distance(R1, R3) <= d12 + geodesic_distance(R2, R3) + 1e-12).all()
    np.testing.assert_allclose(geodesic_distance(Q @ R1, Q @ R2).numpy(), d12.numpy(), atol=1e-12)
    np.testing.assert_allclose(geodesic_distance(R1 @ Q, R2 @ Q).numpy(), d12.numpy(), atol=1e-12)


@pytest.mark.parametrize("function", [expm_so8, cayley, vec_to_skew, skew_to_vec])
def test_sync_free_functions_trace_as_one_graph(function):
    "Dynamo breaks the graph on .item(), data-dependent branches and data-dependent shapes, i.e. on host syncs."
    x = torch.randn(5, 28, dtype=torch.float64)
    x = x if function is vec_to_skew else vec_to_skew(x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(x)
    assert explanation.graph_count == 1 and explanation.break_reasons == [], explanation.break_reasons


def test_the_graph_check_catches_a_host_sync():
    def synchronising(A): return expm_so8(A / torch.linalg.matrix_norm(A).max().item())
    torch._dynamo.reset()
    assert torch._dynamo.explain(synchronising)(vec_to_skew(torch.randn(5, 28))).break_reasons != []


@pytest.mark.parametrize("call, message", [
    (lambda: vec_to_skew(torch.zeros(8, 8)), "v must have shape [..., 28]"),
    (lambda: skew_to_vec(torch.zeros(28)), "A must have shape [..., 8, 8]"),
    (lambda: expm_so8(np.zeros((8, 8))), "A must be a torch.Tensor"),
    (lambda: expm_so8(torch.zeros(8, 8, dtype=torch.int64)), "A must be float32 or float64"),
    (lambda: expm_so8(torch.zeros(8, 8), max_squarings=1.5), "max_squarings must be a non-negative integer, got 1.5"),
    (lambda: cayley(torch.zeros(4, 4)), "A must have shape [..., 8, 8]"),
    (lambda: logm_so8(torch.zeros(8, 9)), "R must have shape [..., 8, 8]"),
    (lambda: canonical_angles(torch.eye(8, dtype=torch.float16)), "R must be float32 or float64"),
    (lambda: geodesic_distance(torch.eye(8), "I"), "R2 must be a torch.Tensor"),
    (lambda: geodesic_distance(torch.eye(7), torch.eye(8)), "R1 must have shape [..., 8, 8]"),
    (lambda: random_rotation(3.0), "shape[0] must be a non-negative integer, got 3.0"),
    (lambda: random_rotation(2, dtype=torch.int32), "dtype must be torch.float32 or torch.float64"),
    (lambda: skew_from_angles(torch.zeros(2, 3)), "angles must have shape [..., 4]"),
])
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        call()
