"""Reading input images and writing outputs for `liif-cuda upscale`: the formats, the checks that need
no decoding, and writes to a temporary file renamed at the end (never a partial output)."""

import os

from .._files import png_bit_depth, write_atomically
from .common import CliError, notice

INPUT_FORMATS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                  ".webp": "WEBP"}


def check_input(path):
    """The checks of an input that need no decoding; raises CliError."""
    if not os.path.exists(path):
        raise CliError(f"input {path} is a broken symbolic link (or a loop)" if os.path.islink(path)
                       else f"input {path} does not exist")
    if not os.path.isfile(path):
        raise CliError(f"input {path} is not a file")
    if os.path.splitext(path)[1].lower() not in INPUT_FORMATS:
        raise CliError(f"input {path}: unsupported format (use PNG, JPEG, TIFF or WebP)")
    if png_bit_depth(path) == 16:
        # Pillow reads 16-bit colour PNGs as 8-bit: refuse rather than lose the precision silently.
        raise CliError(f"input {path} is a 16-bit PNG, which is not supported; convert it to 8 bits "
                       f"(the Python API takes 16-bit numpy arrays)")


def read_image(path):
    from PIL import Image, UnidentifiedImageError
    check_input(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise CliError(f"input {path} cannot be read as an image ({exc})") from None


def image_header_size(path):
    """(width, height) from the file's header, without decoding it (to name and skip outputs)."""
    from PIL import Image
    check_input(path)
    try:
        with Image.open(path) as im:
            return im.size
    except (Image.DecompressionBombError, OSError, ValueError) as exc:
        raise CliError(f"input {path} cannot be read as an image ({exc})") from None


def write_image(image, path, overwrite):
    fmt = OUTPUT_FORMATS[os.path.splitext(path)[1].lower()]
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        notice(f"JPEG has no alpha channel; the alpha of the result is dropped for {path}")
        image = image.convert("RGB" if image.mode == "RGBA" else "L")

    def refuse_existing():  # checked again at the end: the file may have appeared meanwhile
        if not overwrite and os.path.exists(path):
            raise CliError(f"output {path} exists; pass --overwrite to replace it")
    try:
        write_atomically(path, lambda f: image.save(f, format=fmt), prefix=".liif-cuda-",
                         before_replace=refuse_existing)
    except OSError as exc:  # its strerror: the message would name the temporary file
        raise CliError(f"cannot write {path} ({exc.strerror or exc})") from None
