"""Output sizes for `liif-cuda upscale`: --size parsing and the memory an output needs, said in
readable units whatever the size (the aspect ratio's rule is liif_cuda.upscaling's)."""

import decimal

from .common import CliError

# Bytes per output pixel the upscaler holds at the end: float32 RGB result, its copy in the output
# dtype and the encoded image, with room to spare.
BYTES_PER_OUTPUT_PIXEL = 40
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n):
    """A byte count in the binary unit that keeps it under 1000, to 3 significant digits ("9.31 GiB");
    past 1000 EiB, which no machine has, bytes in scientific notation ("4.8e+25 bytes"). Takes
    integers of any size: float() of the byte count of an absurd scale would overflow."""
    n = int(n)
    if n >= 1000 * 1024 ** 6:
        return f"{decimal.Decimal(n):.2g} bytes"
    if n < 1000:
        return f"{n} B"
    for power, unit in enumerate(BYTE_UNITS[1:], 1):
        value = n / 1024 ** power
        if value < 999.5:
            return f"{value:.3g} {unit}"
    return f"{decimal.Decimal(n):.2g} bytes"


def describe_size(w, h):
    """'a 1920x1080 output', or the pixel count in scientific notation when the sides are absurd."""
    if max(w, h) < 10 ** 12:
        return f"a {w}x{h} output"
    return f"an output of {decimal.Decimal(w * h):.2g} pixels"


def parse_size(text):
    """'WxH', 'Wx' or 'xH' -> (w, h) with None for a side to take from the aspect ratio."""
    parts = text.strip().lower().split("x")
    try:
        if len(parts) != 2 or parts == ["", ""]:
            raise ValueError
        w, h = (int(v) if v.strip() else None for v in parts)
    except ValueError:
        raise CliError(f"--size must be WIDTHxHEIGHT, WIDTHx or xHEIGHT, e.g. 1920x1080, got "
                       f"{text!r}", 2) from None
    if (w is not None and w < 1) or (h is not None and h < 1):
        raise CliError(f"--size must be positive, got {text!r}", 2)
    return w, h


def check_scale(scale):
    if scale is None:
        return
    if not 0 < scale < float("inf"):  # nan fails both comparisons
        raise CliError(f"--scale must be a finite number > 0, got {scale:g}", 2)


def available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(out_w, out_h):
    needed = out_h * out_w * BYTES_PER_OUTPUT_PIXEL
    free = available_memory()
    if free is not None and needed > free:
        raise CliError(f"{describe_size(out_w, out_h)} needs about {format_bytes(needed)}, more "
                       f"than the {format_bytes(free)} of memory available")
