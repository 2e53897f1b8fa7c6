"""Image file rules shared by training (data.py), enrolment and the web UI (numpy + Pillow only).

- Only regular files are images: a FIFO, socket or device named *.jpg would block `open()` forever.
- `to_rgb` keeps 16-bit and float images: PIL's convert("RGB") clips a 16-bit PNG's values at 255 (all white);
  here they are scaled to 8 bits first.
- `open_rgb(path, max_pixels)` bounds the decode: JPEGs decode at a reduced scale (draft) when the image has more
  pixels than `max_pixels`; other formats above it are refused (PIL would hold the whole raster in memory).
"""
import os
import stat

import numpy as np
from PIL import Image

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageTooLarge(ValueError):
    pass


def is_regular_file(path) -> bool:
    """True for a regular file (symlinks followed); False for missing paths, folders, FIFOs, sockets, devices."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def to_rgb(img):
    """PIL image -> RGB, scaling 16-bit / 32-bit / float rasters to 8 bits instead of clipping them."""
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        top = float(a.max(initial=0.0))
        if img.mode == "F" and top <= 1.0:
            hi = 1.0
        elif img.mode.startswith("I;16") or top > 255:
            hi = 65535.0
        else:
            hi = 255.0
        a = np.clip(np.nan_to_num(a) * (255.0 / hi), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(a, "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path, max_pixels=None):
    """Decoded RGB image of a regular file -> (image, scale), scale = decoded width / original width (< 1 when a
    large JPEG was decoded reduced). Raises OSError/ValueError (ImageTooLarge) on anything unusable."""
    if not is_regular_file(path):
        raise OSError(f"{path}: not a regular file")
    with Image.open(path) as im:
        w0 = im.size[0]
        if max_pixels and im.size[0] * im.size[1] > max_pixels:
            if im.format == "JPEG":
                f = (im.size[0] * im.size[1] / max_pixels) ** 0.5
                im.draft("RGB", (max(1, int(im.size[0] / f)), max(1, int(im.size[1] / f))))
            if im.size[0] * im.size[1] > max_pixels * 4:  # draft's scales are 1/2..1/8; still far too big
                raise ImageTooLarge(f"{path}: {im.size[0]}x{im.size[1]} pixels is too large to decode here")
        im.load()
        return to_rgb(im), im.size[0] / max(1, w0)
