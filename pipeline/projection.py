"""The fixed projection of teacher hidden states stored in the cache: (H,) -> (d,).

identity keeps the full width; random is a seeded matrix with orthonormal columns (it keeps
norms and angles in expectation); pca is fitted from teacher states on the first sequences of the
corpus: uncentred, so the cosine between projected states tracks the cosine between the states
themselves. The matrix is saved with the cache (safetensors) and its hash is in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save

from kdpipe.pipeline.errors import KdpipeError, tensor_file_errors
from kdpipe.pipeline.fsutil import atomic_write_bytes

ProjectionKind = Literal["identity", "random", "pca"]
PROJECTION_KEY = "projection"


def identity(width: int) -> torch.Tensor:
    return torch.eye(width, dtype=torch.float32)


def random_orthogonal(width: int, dim: int, seed: int) -> torch.Tensor:
    """(width, dim) with orthonormal columns, a pure function of (width, dim, seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, width, dim, 0x50]))
    g = rng.standard_normal((width, dim))
    q, r = np.linalg.qr(g)
    q *= np.sign(np.diag(r))  # unique QR: the projection does not depend on LAPACK's sign choice
    return torch.from_numpy(q.astype(np.float32))


def fit_pca(states: torch.Tensor, dim: int) -> torch.Tensor:
    """(H, dim) top right-singular vectors of the (N, H) states, in float64, signs fixed."""
    x = states.double()
    eigval, eigvec = torch.linalg.eigh(x.T @ x)  # ascending
    top = eigvec[:, torch.argsort(eigval, descending=True)[:dim]]
    signs = torch.sign(top[top.abs().argmax(dim=0), torch.arange(dim)])
    return (top * signs).float()


DEFAULT_DIM = 128


def check_dim(kind: ProjectionKind, width: int, dim: int | None) -> int:
    """The stored width: the teacher's for identity, else `dim` (default 128, at most the width)."""
    d = dim if dim is not None else (width if kind == "identity" else min(DEFAULT_DIM, width))
    if kind == "identity" and d != width:
        raise KdpipeError(f"--hidden-proj identity keeps the teacher width {width}; "
                          f"--hidden-dim {d} needs random or pca")
    if not 1 <= d <= width:
        raise KdpipeError(f"--hidden-dim must be between 1 and the teacher width {width}, got {d}")
    return d


LAYERS_KEY = "layers"  # the (n, H, d) projections of a cache's hidden_layers (pipeline/layer_targets.py)


def save_projection(path: Path, matrix: torch.Tensor, layers: torch.Tensor | None = None) -> None:
    """The last layer's (H, d) matrix and, where the cache stores other layers, their (n, H, d) stack."""
    tensors = {PROJECTION_KEY: matrix.contiguous()}
    if layers is not None:
        tensors[LAYERS_KEY] = layers.contiguous()
    atomic_write_bytes(path, save(tensors))


def load_projection(path: Path) -> torch.Tensor:
    with tensor_file_errors(path):
        return load_file(str(path))[PROJECTION_KEY]


def load_layer_projections(path: Path) -> torch.Tensor:
    """The (n, H, d) stack of the other layers' projections, refused where the file holds none."""
    with tensor_file_errors(path):
        tensors = load_file(str(path))
    if LAYERS_KEY not in tensors:
        raise KdpipeError(f"{path} holds no {LAYERS_KEY!r} projections, though the manifest lists hidden layers")
    return tensors[LAYERS_KEY]
