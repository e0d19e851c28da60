"""The training data of the LIIF recipe (spec section 8.1), written for this project: image folders and
the two wrappers that turn images into (LR patch, query coordinates, cells, HR colours) samples.

Randomness: every sample draws from its own numpy Generator seeded by (run seed, epoch, index), so a
sample does not depend on the DataLoader's workers, their number or the order they run in; runs are
reproducible and a resumed run sees the batches the uninterrupted one would have seen.
"""

import json
import os

import numpy as np
import torch
from PIL import Image

from .._files import wider_than_8_bits
from ..upscaling import pixel_centres
from .config import ConfigError, TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def not_a_folder(what, folder):
    """The error for a dataset folder that is not one, named as `what` (a config key), with a hint
    where the path is the packaged configs' (they read DIV2K from ./load/div2k/, as the original
    code did)."""
    hint = ("; the packaged configs read DIV2K from ./load/div2k/, for other images copy a config "
            "and edit its root_path: docs/training.md"
            if "load/div2k" in os.fspath(folder).replace(os.sep, "/") else "")
    return ConfigError(f"{what} {folder} is not a folder{hint}")


def list_images(root_path, split_file=None, split_key=None, first_k=None):
    """The image files of a folder: sorted, or the names listed under `split_key` in the JSON
    `split_file`; the first `first_k` of them."""
    if not os.path.isdir(root_path):
        raise not_a_folder("dataset root_path", root_path)
    if split_file is not None:
        with open(split_file) as f:
            names = json.load(f)[split_key]
    else:
        names = sorted(f for f in os.listdir(root_path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if first_k is not None:
        names = names[:first_k]
    if not names:
        raise ConfigError(f"dataset root_path {root_path} holds no images")
    return [os.path.join(root_path, n) for n in names]


def open_image(path):
    """The opened image (header only), refusing 16-bit and other wide images: convert('RGB') clips
    16-bit grayscale to nearly white and drops the low byte of 16-bit colour, as `liif-cuda upscale`
    refuses them. Errors name the file (Pillow's do not)."""
    try:
        img = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise TrainingError(f"training image {path} cannot be read ({exc})") from None
    if wider_than_8_bits(img, path):
        img.close()
        raise TrainingError(f"training image {path} is a 16-bit (or wider) image, which training "
                            f"does not support; convert it to 8 bits")
    return img


def read_rgb(path):
    """(3, H, W) uint8 tensor; Pillow's convert('RGB') as the original loader does."""
    with open_image(path) as img:
        try:
            rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
            raise TrainingError(f"training image {path} cannot be read ({exc})") from None
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


class ImageFolder(torch.utils.data.Dataset):
    """`image-folder`: the images of a folder as (3, H, W) float tensors in [0, 1], each listed
    `repeat` times. cache "in_memory" keeps them decoded (as uint8, a quarter of the original's
    float tensors), "none" reads them on every access."""

    def __init__(self, root_path, split_file=None, split_key=None, first_k=None, repeat=1,
                 cache="none"):
        self.paths = list_images(root_path, split_file, split_key, first_k)
        self.repeat = repeat
        self.images = [read_rgb(p) for p in self.paths] if cache == "in_memory" else None
        # Not cached: every header read now, so that an unreadable or 16-bit image is refused
        # before the first epoch (its data, only when it is read).
        self.sizes = None if self.images is not None else [self._header_size(p) for p in self.paths]

    @staticmethod
    def _header_size(path):
        with open_image(path) as img:
            return img.height, img.width

    def size(self, i):
        """(height, width) of image i, from the file's header when not cached."""
        if self.images is not None:
            return tuple(self.images[i].shape[-2:])
        return self.sizes[i]

    def __len__(self):
        return len(self.paths) * self.repeat

    def path(self, idx):
        return self.paths[idx % len(self.paths)]

    def __getitem__(self, idx):
        i = idx % len(self.paths)
        img = self.images[i] if self.images is not None else read_rgb(self.paths[i])
        return img.float() / 255


class PairedImageFolders(torch.utils.data.Dataset):
    """`paired-image-folders`: (LR, HR) pairs of two folders matched by position."""

    def __init__(self, root_path_1, root_path_2, **kwargs):
        self.first = ImageFolder(root_path_1, **kwargs)
        self.second = ImageFolder(root_path_2, **kwargs)
        if len(self.first.paths) != len(self.second.paths):
            raise ConfigError(f"paired-image-folders: {root_path_1} holds {len(self.first.paths)} "
                              f"images, {root_path_2} {len(self.second.paths)}")

    def __len__(self):
        return len(self.first)

    def path(self, idx):
        return self.second.path(idx)  # the HR image

    def __getitem__(self, idx):
        return self.first[idx], self.second[idx]


def resize_bicubic(img, height, width):
    """The original resize_fn: float image to 8 bits by truncation (torchvision's ToPILImage),
    Pillow bicubic, back to [0, 1]."""
    array = (img * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    resized = Image.fromarray(array).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255


def pixel_samples(img):
    """make_coord of the image's pixel centres (H*W, 2) and its colours (H*W, 3)."""
    h, w = img.shape[-2:]
    coord = torch.stack(torch.meshgrid(pixel_centres(h), pixel_centres(w), indexing="ij"), -1)
    return coord.view(-1, 2), img.reshape(3, -1).permute(1, 0)


class _Wrapper(torch.utils.data.Dataset):
    """`where`: the dataset's key in the config (train_dataset, val_dataset), named by errors."""

    def __init__(self, dataset, inp_size=None, augment=False, sample_q=None, seed=0,
                 where="train_dataset"):
        self.dataset = dataset
        self.where = where
        self.inp_size = inp_size
        self.augment = augment
        self.sample_q = sample_q
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Before each epoch (and before the DataLoader's workers start): the samples' seeds."""
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def rng(self, idx):
        return np.random.default_rng([self.seed, self.epoch, idx])

    def finish(self, idx, rng, crop_lr, crop_hr):
        """Augmentation, the query samples and their cells, as the original wrappers end."""
        if self.augment:
            hflip, vflip, dflip = (rng.random() < 0.5 for _ in range(3))

            def augment(x):
                if hflip:
                    x = x.flip(-2)
                if vflip:
                    x = x.flip(-1)
                if dflip:
                    x = x.transpose(-2, -1)
                return x
            crop_lr, crop_hr = augment(crop_lr), augment(crop_hr)
        coord, rgb = pixel_samples(crop_hr.contiguous())
        if self.sample_q is not None:
            if self.sample_q > len(coord):
                # Whole images and paired folders: known only here (check_config checks patches).
                h, w = crop_hr.shape[-2:]
                raise ConfigError(f"{self.where}.wrapper.args.sample_q {self.sample_q} exceeds the "
                                  f"{len(coord)} pixels of the HR patch ({h}x{w}) of "
                                  f"{self.dataset.path(idx)}")
            keep = torch.from_numpy(rng.choice(len(coord), self.sample_q, replace=False))
            coord, rgb = coord[keep], rgb[keep]
        cell = torch.ones_like(coord)
        cell[:, 0] *= 2 / crop_hr.shape[-2]
        cell[:, 1] *= 2 / crop_hr.shape[-1]
        return {"inp": crop_lr.contiguous(), "coord": coord, "cell": cell, "gt": rgb.contiguous()}


class SRImplicitDownsampled(_Wrapper):
    """`sr-implicit-downsampled`: per sample a scale s ~ U(scale_min, scale_max), a random HR patch
    of round(inp_size * s) pixels and its LR of inp_size made with Pillow bicubic (inp_size None:
    the whole image, LR floor(H / s), HR cropped to round(LR * s))."""

    def __init__(self, dataset, inp_size=None, scale_min=1, scale_max=None, augment=False,
                 sample_q=None, seed=0, where="train_dataset"):
        super().__init__(dataset, inp_size, augment, sample_q, seed, where)
        self.scale_min = scale_min
        self.scale_max = scale_min if scale_max is None else scale_max
        self.refuse_small_images()

    def refuse_small_images(self):
        """An image smaller than the largest HR patch would make some samples impossible: refuse
        it at the start, naming it, rather than fail or skip in the middle of an epoch."""
        if self.inp_size is None:
            return
        need = round(self.inp_size * self.scale_max)
        sizes = [(p, self.dataset.size(i)) for i, p in enumerate(self.dataset.paths)]
        small = [(p, size) for p, size in sizes if min(size) < need]
        if small:
            names = ", ".join(f"{os.path.basename(p)} ({h}x{w})" for p, (h, w) in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise ConfigError(f"images smaller than the {need}x{need} HR patch of inp_size "
                              f"{self.inp_size} at scale_max {self.scale_max}: {names}{more}")

    def __getitem__(self, idx):
        img = self.dataset[idx]
        rng = self.rng(idx)
        s = rng.uniform(self.scale_min, self.scale_max)
        if self.inp_size is None:
            h_lr = int(np.floor(img.shape[-2] / s + 1e-9))
            w_lr = int(np.floor(img.shape[-1] / s + 1e-9))
            crop_hr = img[:, :round(h_lr * s), :round(w_lr * s)]
            crop_lr = resize_bicubic(crop_hr, h_lr, w_lr)
        else:
            w_lr = self.inp_size
            w_hr = round(w_lr * s)
            x0 = int(rng.integers(0, img.shape[-2] - w_hr + 1))
            y0 = int(rng.integers(0, img.shape[-1] - w_hr + 1))
            crop_hr = img[:, x0:x0 + w_hr, y0:y0 + w_hr]
            crop_lr = resize_bicubic(crop_hr, w_lr, w_lr)
        return self.finish(idx, rng, crop_lr, crop_hr)


class SRImplicitPaired(_Wrapper):
    """`sr-implicit-paired`: LR and HR images of an integer scale; random aligned patches of
    inp_size LR pixels (inp_size None: the whole LR image and its HR)."""

    def __getitem__(self, idx):
        img_lr, img_hr = self.dataset[idx]
        rng = self.rng(idx)
        s = img_hr.shape[-2] // img_lr.shape[-2]
        if s < 1:
            raise ValueError(f"paired images: the HR image of item {idx} is smaller than its LR")
        if self.inp_size is None:
            h_lr, w_lr = img_lr.shape[-2:]
            crop_lr, crop_hr = img_lr, img_hr[:, :h_lr * s, :w_lr * s]
        else:
            w_lr = self.inp_size
            if min(img_lr.shape[-2:]) < w_lr:
                raise ValueError(f"paired images: an LR image of item {idx} is smaller than "
                                 f"inp_size {w_lr}")
            x0 = int(rng.integers(0, img_lr.shape[-2] - w_lr + 1))
            y0 = int(rng.integers(0, img_lr.shape[-1] - w_lr + 1))
            crop_lr = img_lr[:, x0:x0 + w_lr, y0:y0 + w_lr]
            crop_hr = img_hr[:, x0 * s:(x0 + w_lr) * s, y0 * s:(y0 + w_lr) * s]
        return self.finish(idx, rng, crop_lr, crop_hr)


def first_k_shortfall(spec, wrapped, where="train_dataset"):
    """A note for a `first_k` above the images there are (the original takes them all, silently,
    so a run on fewer images than its config says goes unnoticed), or None."""
    first_k = (spec["dataset"].get("args") or {}).get("first_k")
    folder = wrapped.dataset
    count = len((folder.first if isinstance(folder, PairedImageFolders) else folder).paths)
    if first_k is None or count >= first_k:
        return None
    return (f"{where}.dataset.args.first_k is {first_k}, but there are {count} images: all "
            f"{count} are used")


def make_dataset(spec, seed, where="train_dataset"):
    """The wrapped dataset of a checked `train_dataset` / `val_dataset` (`where`) spec."""
    args = dict(spec["dataset"].get("args") or {})
    args.setdefault("cache", "none")
    for key in ("root_path", "root_path_1", "root_path_2"):
        folder = args.get(key)
        if folder is not None and not isinstance(folder, str):  # YAML reads `2024` as a number
            raise ConfigError(f"{where}.dataset.args.{key} must be a folder's path, got {folder!r}")
        if folder is not None and not os.path.isdir(folder):
            # Named by its key: a config has two datasets, a paired one two folders.
            raise not_a_folder(f"{where}.dataset.args.{key}", folder)
    if spec["dataset"]["name"] == "image-folder":
        dataset = ImageFolder(**args)
    else:
        dataset = PairedImageFolders(**args)
    wrapper_args = dict(spec["wrapper"].get("args") or {})
    if spec["wrapper"]["name"] == "sr-implicit-downsampled":
        return SRImplicitDownsampled(dataset, seed=seed, where=where, **wrapper_args)
    return SRImplicitPaired(dataset, seed=seed, where=where, **wrapper_args)
