"""The hidden-state projection stored with a cache: identity, seeded random orthogonal, PCA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kdpipe.pipeline import projection as proj
from kdpipe.pipeline.errors import KdpipeError


def orthonormal_columns(q: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    return torch.allclose(q.double().T @ q.double(), eye, atol=atol)


def test_identity_round_trip() -> None:
    x = torch.randn(10, 32)
    eye = proj.identity(32)
    assert eye.dtype == torch.float32
    assert torch.equal(x @ eye, x)


@pytest.mark.parametrize("width, dim", [(32, 16), (384, 128), (64, 64), (16, 1)])
def test_random_orthogonal(width: int, dim: int) -> None:
    q = proj.random_orthogonal(width, dim, seed=5)
    assert q.shape == (width, dim) and q.dtype == torch.float32
    assert orthonormal_columns(q)
    assert torch.equal(q, proj.random_orthogonal(width, dim, seed=5))  # a pure function of the seed
    assert not torch.allclose(q, proj.random_orthogonal(width, dim, seed=6))
    if dim == width:  # square: angles and norms kept exactly
        x = torch.randn(8, width, dtype=torch.float64)
        y = x @ q.double()
        assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)


def test_random_projection_keeps_cosines_roughly() -> None:
    """384 -> 128: the cosine of two states moves by little on average (it is a random map)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 384, generator=g), torch.randn(500, 384, generator=g)
    b = a + 0.8 * b  # correlated pairs, cosine ~0.78
    q = proj.random_orthogonal(384, 128, seed=0)
    cos = torch.nn.functional.cosine_similarity
    change = (cos(a @ q, b @ q) - cos(a, b)).abs().mean().item()
    assert change < 0.06


def synthetic_states(n: int = 2000, width: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(width, generator=g)
    u /= u.norm()
    coeff = 10 + 3 * torch.randn(n, 1, generator=g)
    return coeff * u + 0.5 * torch.randn(n, width, generator=g), u


def test_pca_captures_the_dominant_direction() -> None:
    states, u = synthetic_states()
    p = proj.fit_pca(states, 8)
    assert p.shape == (48, 8) and p.dtype == torch.float32
    assert orthonormal_columns(p)
    assert abs(float(p[:, 0] @ u)) > 0.99
    # signs are fixed (largest |entry| of each column positive): no LAPACK-dependent flips
    cols = torch.arange(8)
    assert (p[p.abs().argmax(dim=0), cols] > 0).all()
    # energy kept: the signal (~109 per row) and 8 of 48 noise dims (8 * 0.25) of ~121 in all
    kept = (states @ p).norm() ** 2 / states.norm() ** 2
    assert kept > 0.9


def test_pca_is_deterministic() -> None:
    states, _ = synthetic_states(seed=1)
    assert torch.equal(proj.fit_pca(states, 6), proj.fit_pca(states.clone(), 6))


def test_pca_beats_random_on_structured_data() -> None:
    """On low-rank data the fitted projection keeps more energy than a random one."""
    g = torch.Generator().manual_seed(2)
    states = torch.randn(1000, 4, generator=g) @ torch.randn(4, 64, generator=g)
    energy = lambda p: ((states @ p).norm() / states.norm()).item()  # noqa: E731
    assert energy(proj.fit_pca(states, 4)) > 0.999
    assert energy(proj.random_orthogonal(64, 4, seed=0)) < 0.6


@pytest.mark.parametrize("make", [lambda: proj.identity(32), lambda: proj.random_orthogonal(32, 8, 1),
                                  lambda: proj.fit_pca(synthetic_states(width=32)[0], 8)])
def test_save_load_round_trip(tmp_path: Path, make) -> None:
    m = make()
    path = tmp_path / "projection.safetensors"
    proj.save_projection(path, m)
    assert torch.equal(proj.load_projection(path), m)
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, no pickle
        assert list(f.keys()) == [proj.PROJECTION_KEY]
    assert not list(tmp_path.glob(".*.tmp"))


def test_check_dim() -> None:
    assert proj.check_dim("identity", 384, None) == 384
    assert proj.check_dim("pca", 384, None) == 128
    assert proj.check_dim("random", 32, None) == 32
    assert proj.check_dim("random", 384, 64) == 64
    with pytest.raises(KdpipeError, match="identity keeps the teacher width"):
        proj.check_dim("identity", 384, 128)
    with pytest.raises(KdpipeError, match="between 1 and the teacher width 32"):
        proj.check_dim("pca", 32, 64)
