"""Plain PyTorch restatement of the original LIIF models (models/edsr.py, models/rdn.py, models/liif.py
of github.com/yinboc/liif): the test oracle for liif_cuda.models and the upscaler. Not installed.

The encoders are built without upsampler (`no_upsampling=True`), as LIIF uses them; the module names are
the original ones, so the original checkpoints load with load_state_dict as they are.
"""

import torch
import torch.nn as nn

from liif_reference import MLP, batched_query_rgb, query_rgb


def default_conv(in_channels, out_channels, kernel_size, bias=True):
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size // 2), bias=bias)


class MeanShift(nn.Conv2d):
    def __init__(self, rgb_range, rgb_mean=(0.4488, 0.4371, 0.4040), rgb_std=(1.0, 1.0, 1.0),
                 sign=-1):
        super().__init__(3, 3, kernel_size=1)
        std = torch.Tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.Tensor(rgb_mean) / std
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    def __init__(self, conv, n_feats, kernel_size, bias=True, act=nn.ReLU(True), res_scale=1):
        super().__init__()
        m = []
        for i in range(2):
            m.append(conv(n_feats, n_feats, kernel_size, bias=bias))
            if i == 0:
                m.append(act)
        self.body = nn.Sequential(*m)
        self.res_scale = res_scale

    def forward(self, x):
        res = self.body(x).mul(self.res_scale)
        res += x
        return res


class EDSR(nn.Module):
    """EDSR-baseline (16 blocks, 64 features, res_scale 1), no_upsampling."""

    def __init__(self, n_resblocks=16, n_feats=64, res_scale=1, rgb_range=1, n_colors=3,
                 conv=default_conv):
        super().__init__()
        kernel_size = 3
        act = nn.ReLU(True)
        self.sub_mean = MeanShift(rgb_range)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv(n_colors, n_feats, kernel_size))
        m_body = [ResBlock(conv, n_feats, kernel_size, act=act, res_scale=res_scale)
                  for _ in range(n_resblocks)]
        m_body.append(conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*m_body)
        self.out_dim = n_feats

    def forward(self, x):
        x = self.head(x)
        res = self.body(x)
        res += x
        return res


class RDB_Conv(nn.Module):
    def __init__(self, in_channels, grow_rate, k_size=3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, grow_rate, k_size, padding=(k_size - 1) // 2,
                                            stride=1), nn.ReLU())

    def forward(self, x):
        out = self.conv(x)
        return torch.cat((x, out), 1)


class RDB(nn.Module):
    def __init__(self, grow_rate0, grow_rate, n_conv_layers, k_size=3):
        super().__init__()
        convs = [RDB_Conv(grow_rate0 + c * grow_rate, grow_rate) for c in range(n_conv_layers)]
        self.convs = nn.Sequential(*convs)
        self.LFF = nn.Conv2d(grow_rate0 + n_conv_layers * grow_rate, grow_rate0, 1, padding=0,
                             stride=1)

    def forward(self, x):
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    """RDN config B (D=16, C=8, G=64), G0=64, no_upsampling."""

    def __init__(self, G0=64, D=16, C=8, G=64, k_size=3, n_colors=3):
        super().__init__()
        self.D = D
        self.SFENet1 = nn.Conv2d(n_colors, G0, k_size, padding=(k_size - 1) // 2, stride=1)
        self.SFENet2 = nn.Conv2d(G0, G0, k_size, padding=(k_size - 1) // 2, stride=1)
        self.RDBs = nn.ModuleList([RDB(grow_rate0=G0, grow_rate=G, n_conv_layers=C)
                                   for _ in range(D)])
        self.GFF = nn.Sequential(nn.Conv2d(D * G0, G0, 1, padding=0, stride=1),
                                 nn.Conv2d(G0, G0, k_size, padding=(k_size - 1) // 2, stride=1))
        self.out_dim = G0

    def forward(self, x):
        f__1 = self.SFENet1(x)
        x = self.SFENet2(f__1)
        RDBs_out = []
        for i in range(self.D):
            x = self.RDBs[i](x)
            RDBs_out.append(x)
        x = self.GFF(torch.cat(RDBs_out, 1))
        x += f__1
        return x


class LIIF(nn.Module):
    def __init__(self, encoder, hidden_list=(256, 256, 256, 256), out_dim=3, local_ensemble=True,
                 feat_unfold=True, cell_decode=True):
        super().__init__()
        self.local_ensemble = local_ensemble
        self.feat_unfold = feat_unfold
        self.cell_decode = cell_decode
        self.encoder = encoder
        imnet_in_dim = encoder.out_dim * (9 if feat_unfold else 1) + 2 + (2 if cell_decode else 0)
        self.imnet = MLP(imnet_in_dim, out_dim, list(hidden_list))

    def gen_feat(self, inp):
        self.feat = self.encoder(inp)
        return self.feat

    def query_rgb(self, coord, cell=None):
        return query_rgb(self.feat, coord, cell, self.imnet, local_ensemble=self.local_ensemble,
                         feat_unfold=self.feat_unfold, cell_decode=self.cell_decode)

    def forward(self, inp, coord, cell):
        self.gen_feat(inp)
        return self.query_rgb(coord, cell)


def load_original(path):
    """The official checkpoint (original format) as this reference model, in eval mode."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = LIIF(EDSR())
    model.load_state_dict(ck["model"]["sd"])
    return model.eval()


def upscale_reference(model, img, out_h, out_w, bsize=30000):
    """The original test procedure: (x - 0.5) / 0.5, batched query over the full output grid,
    pred * 0.5 + 0.5 clamped to [0, 1]. img (1, 3, H, W) in [0, 1] -> (1, 3, out_h, out_w)."""
    from liif_reference import make_cell, make_coord
    with torch.no_grad():
        coord = make_coord((out_h, out_w)).unsqueeze(0)
        cell = make_cell(coord, (out_h, out_w))
        feat = model.gen_feat((img - 0.5) / 0.5)
        pred = batched_query_rgb(feat, coord, cell, model.imnet, bsize=bsize,
                                 local_ensemble=model.local_ensemble,
                                 feat_unfold=model.feat_unfold, cell_decode=model.cell_decode)
        pred = (pred * 0.5 + 0.5).clamp(0, 1)
    return pred.view(1, out_h, out_w, 3).permute(0, 3, 1, 2)
