"""Writing files so that no interruption leaves a partial one: shared by the writers of images,
checkpoints, logs and configs; and the checks of image files that take more than 8 bits."""

import os
import tempfile


def give_default_mode(path):
    """mkstemp makes files private (0600); a file written through a temporary one gets the mode any
    new file gets here (0666 less the umask), so that others read it as they would a file written
    in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomically(path, write, binary=True, prefix=None, before_replace=None):
    """Writes `path` through a temporary file in the same folder, flushed to disk and renamed over
    it: readers see the old file or the new one, never a partial one. `write(f)` writes the content
    into the open file; `before_replace()`, if given, runs just before the rename and may raise to
    leave `path` as it is. On any error the temporary file is removed and the error raised."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = prefix if prefix is not None else f".{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def png_bit_depth(path):
    """The bit depth in a PNG file's header, or None for a file that is not a PNG. Pillow reads a
    16-bit colour PNG as 8-bit (the low byte dropped) and convert("RGB") clips 16-bit grayscale to
    255, so the readers that take 8 bits refuse 16-bit PNGs by this."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25 else None


def wider_than_8_bits(image, path):
    """Whether an opened PIL image (read from `path`) has more than 8 bits per channel: Pillow's
    I and F modes (16-bit grayscale, whose convert("RGB") clips to 255) or a 16-bit PNG (colour
    ones are read as 8-bit, their low byte dropped). For the readers that take 8 bits."""
    return image.mode.startswith(("I", "F")) or png_bit_depth(path) == 16
