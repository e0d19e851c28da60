"""Inputs for the query tests."""

import torch

import liif_reference as ref


def make_mlp(in_dim, hidden, out_dim, dtype, seed=0):
    torch.manual_seed(seed)
    return ref.MLP(in_dim, out_dim, list(hidden)).to(dtype)


def border_coords(height, width, batch, queries, generator, dtype):
    """Coordinates on LR pixel edges and centres, on the edges shifted by the ensemble's shifts, and
    on the image border: the places where nearest sampling has to break a tie or clamp."""
    def axis(n, size):
        k = torch.randint(0, n + 1, size, generator=generator).to(torch.float64)
        centre = torch.randint(0, 2, size, generator=generator) * (1 / n)
        point = (-1 + 2 * k / n + centre).to(dtype)  # an edge or a centre, rounded to dtype
        # Subtract (in dtype) one of the ensemble's shifts, rounded as the reference rounds them, so
        # that the shifted coordinate lands on the edge or centre itself.
        shifts = torch.tensor([0.0, 1 / n + 1e-6, -1 / n + 1e-6, 1e-6], dtype=torch.float64)
        kind = torch.randint(0, len(shifts), size, generator=generator)
        return point - shifts.to(dtype)[kind]

    size = (batch, queries)
    return torch.stack([axis(height, size), axis(width, size)], dim=-1)


def random_cells(batch, queries, generator, dtype):
    return (torch.rand(batch, queries, 2, generator=generator, dtype=torch.float64) * 0.5
            + 1e-3).to(dtype)


def random_inputs(batch, channels, height, width, queries, seed=0, dtype=torch.float32,
                  spread=1.0):
    """feat (B, C, H, W), coords uniform in [-spread, spread] and cells (B, Q, 2)."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, channels, height, width, generator=g, dtype=dtype)
    coords = (torch.rand(batch, queries, 2, generator=g, dtype=dtype) * 2 - 1) * spread
    return feat, coords, random_cells(batch, queries, g, dtype)
