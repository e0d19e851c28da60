"""The LIIF encoders, without upsampler, with the original code's module names (so that the original
checkpoints load as they are; csrc-independent plain PyTorch).

Each encoder exposes `out_dim` (feature channels), `receptive_radius` (how many LR pixels beyond a
pixel can influence its feature) and `default_tile`. The upscaler computes features in overlapping
tiles with at least that margin, so that a tile's inner features equal those of the whole image; the
default tile keeps one tile's activations near 1 GB in float32.
"""

import torch
from torch import nn


def _conv(in_channels, out_channels, kernel_size):
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class ResBlock(nn.Module):
    """conv, ReLU, conv, plus the input (res_scale 1 in EDSR-baseline)."""

    def __init__(self, channels, kernel_size=3, res_scale=1.0):
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels, kernel_size), nn.ReLU(True),
                                  _conv(channels, channels, kernel_size))
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.body(x) * self.res_scale


class EDSRBaseline(nn.Module):
    """EDSR-baseline as LIIF uses it: head conv, 16 residual blocks and a conv, global skip; no
    upsampler. (The original also holds mean-shift convs that LIIF never applies; they are left out.)"""

    def __init__(self, n_resblocks=16, n_feats=64, in_channels=3, kernel_size=3):
        super().__init__()
        self.head = nn.Sequential(_conv(in_channels, n_feats, kernel_size))
        blocks = [ResBlock(n_feats, kernel_size) for _ in range(n_resblocks)]
        self.body = nn.Sequential(*blocks, _conv(n_feats, n_feats, kernel_size))
        self.out_dim = n_feats
        self.receptive_radius = (kernel_size // 2) * (2 * n_resblocks + 2)
        self.default_tile = 512

    def forward(self, x):
        x = self.head(x)
        return self.body(x) + x


class _DenseConv(nn.Module):
    def __init__(self, in_channels, growth, kernel_size):
        super().__init__()
        self.conv = nn.Sequential(_conv(in_channels, growth, kernel_size), nn.ReLU())

    def forward(self, x):
        return torch.cat((x, self.conv(x)), 1)


class _RDB(nn.Module):
    def __init__(self, g0, growth, n_layers, kernel_size):
        super().__init__()
        self.convs = nn.Sequential(*[_DenseConv(g0 + c * growth, growth, kernel_size)
                                     for c in range(n_layers)])
        self.LFF = nn.Conv2d(g0 + n_layers * growth, g0, 1)

    def forward(self, x):
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    """RDN, configuration B (D = 16 blocks of C = 8 layers, G = 64) with G0 = 64; no upsampler."""

    def __init__(self, g0=64, n_blocks=16, n_layers=8, growth=64, in_channels=3, kernel_size=3):
        super().__init__()
        self.SFENet1 = _conv(in_channels, g0, kernel_size)
        self.SFENet2 = _conv(g0, g0, kernel_size)
        self.RDBs = nn.ModuleList([_RDB(g0, growth, n_layers, kernel_size)
                                   for _ in range(n_blocks)])
        self.GFF = nn.Sequential(nn.Conv2d(n_blocks * g0, g0, 1), _conv(g0, g0, kernel_size))
        self.out_dim = g0
        self.receptive_radius = (kernel_size // 2) * (2 + n_blocks * n_layers + 1)
        self.default_tile = 192  # 1,600 channels live at the end (16 block outputs, dense layers)

    def forward(self, x):
        f1 = self.SFENet1(x)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        return self.GFF(torch.cat(outs, 1)) + f1
