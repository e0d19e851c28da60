"""The LIIF model: encoder + MLP, with the original code's interface (`gen_feat`, `query_rgb`, `forward`)
and its query running through the fused operator."""

from torch import nn

from .._query import query


class MLP(nn.Module):
    """The original `models/mlp.py`: Linear/ReLU layers in an `nn.Sequential` named `layers`."""

    def __init__(self, in_dim, out_dim, hidden_list):
        super().__init__()
        layers = []
        last = in_dim
        for hidden in hidden_list:
            layers += [nn.Linear(last, hidden), nn.ReLU()]
            last = hidden
        layers.append(nn.Linear(last, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        shape = x.shape[:-1]
        return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


# Input and output normalisation of each published variant (spec section 4): the model sees
# (x - mean) / std and its prediction p maps back to p * std + mean.
NORMALISATIONS = {
    "original": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "mmedit-edsr": ((0.4488, 0.4371, 0.4040), (1.0, 1.0, 1.0)),
    "mmedit-rdn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class LIIF(nn.Module):
    """Local implicit image function: `forward(inp, coord, cell)` = `gen_feat(inp)` then
    `query_rgb(coord, cell)`, on normalised images as in the original code (see `normalise` and
    `denormalise` for the variant's normalisation, which the original applies outside the model)."""

    def __init__(self, encoder, hidden_list=(256, 256, 256, 256), out_dim=3, local_ensemble=True,
                 feat_unfold=True, cell_decode=True, normalisation="original"):
        super().__init__()
        self.encoder = encoder
        self.local_ensemble = local_ensemble
        self.feat_unfold = feat_unfold
        self.cell_decode = cell_decode
        in_dim = encoder.out_dim * (9 if feat_unfold else 1) + 2 + (2 if cell_decode else 0)
        self.imnet = MLP(in_dim, out_dim, list(hidden_list))
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}, "
                             f"got {normalisation!r}")
        self.normalisation = normalisation
        self.feat = None

    @property
    def mean_std(self):
        return NORMALISATIONS[self.normalisation]

    def normalise(self, img):
        """(B, 3, H, W) image in [0, 1] -> the model's input."""
        mean, std = (img.new_tensor(v).view(1, -1, 1, 1) for v in self.mean_std)
        return (img - mean) / std

    def denormalise(self, pred):
        """(..., 3) predictions -> image values (not clamped)."""
        mean, std = (pred.new_tensor(v) for v in self.mean_std)
        return pred * std + mean

    def gen_feat(self, inp):
        self.feat = self.encoder(inp)
        return self.feat

    def query_rgb(self, coord, cell=None):
        return query(self.feat, coord, cell, self.imnet, local_ensemble=self.local_ensemble,
                     feat_unfold=self.feat_unfold, cell_decode=self.cell_decode)

    def forward(self, inp, coord, cell):
        self.gen_feat(inp)
        return self.query_rgb(coord, cell)
