"""Reading the user's ``eval`` files safely: list a folder, decode one image to 8-bit RGB.

What is read and what is refused (each refusal one :class:`DataError` line naming the
folder or file):

- a folder that cannot be listed (permission denied, vanished) is refused;
- only regular files count (symlinks followed); FIFOs, sockets and devices are skipped
  unopened, so ``--data /proc`` or ``/dev`` cannot block; names starting with ``.`` are
  skipped (macOS ``._x.jpg`` resource forks, ``.git``); a symlink whose target is missing
  is refused (skipping it would silently shrink a calibration or scored set);
- the number of entries in a folder is not capped (a real class folder may hold a
  million images); the depth is: callers list at most three levels, never recursively;
- an image over :data:`MAX_IMAGE_PIXELS` is refused before it is decoded (decompression
  bomb);
- integer images of more than 8 bits (PIL modes I;16*, I) are read as 16-bit and scaled
  to 8 bits (value / 257: 65535 -> 255), refused if a value is outside 0..65535; float
  images (mode F) are read as [0, 1] intensities, refused outside that range. 8-bit
  modes (L, P, RGBA, CMYK, ...) go through PIL's ``convert("RGB")``.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from mame_export.errors import UserError, one_line

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ts")
# PIL's own default (Image.MAX_IMAGE_PIXELS: a quarter GiB of 24-bit pixels), enforced here
# as a refusal: PIL only warns between it and twice it, and errors above.
MAX_IMAGE_PIXELS = 89_478_485
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class DataError(UserError):
    """The data folder is missing, empty, unreadable or does not fit the model."""


def check_folder(root: Path, content: str = "images or class sub-folders") -> None:
    """``root`` exists and is a folder; else one DataError saying what is wrong."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise DataError(f"data folder not found: {root}") from None
    except PermissionError:
        raise DataError(f"data folder {root} cannot be read (permission denied)") from None
    except OSError as e:
        raise DataError(f"data folder {root} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"--data must be a folder of {content}: {root} is not a folder")


def scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """The sub-folders and the regular files in ``folder``, each sorted by name; hidden
    names and special files skipped (see the module docstring)."""
    dirs: list[Path] = []
    files: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        dirs.append(Path(entry.path))
                    elif entry.is_file():
                        files.append(Path(entry.path))
                    elif entry.is_symlink():  # a link to nothing: not skipped silently
                        raise DataError(f"{entry.path} is a broken link (its target "
                                        f"{os.readlink(entry.path)} does not exist)")
                except OSError:  # vanished or unreadable entry (a /proc process that ended)
                    continue
    except PermissionError:
        raise DataError(f"cannot list folder {folder}: permission denied") from None
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror or e}") from None
    return sorted(dirs), sorted(files)


def with_suffix_in(files: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    return [f for f in files if f.suffix.lower() in suffixes]


def read_rgb(path: Path) -> PILImage.Image:
    """``path`` decoded to an 8-bit RGB image (first frame of a multi-frame file)."""
    from PIL import Image

    with warnings.catch_warnings():
        # The size check below decides; PIL's warning would only repeat it on stderr.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                _check_pixels(path, *im.size)
                return _to_rgb(path, im)
        except DataError:
            raise
        except Image.DecompressionBombError as e:  # PIL's own limit, twice ours by default
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            raise DataError(_too_large(path, f"{int(pixels[1]):,} pixels" if pixels
                                       else one_line(str(e)))) from None
        # A corrupt file raises OSError, ValueError, SyntaxError, EOFError, struct.error ...
        # depending on the PIL plugin: each is "cannot read" here.
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {_why(e)}") from None


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(_too_large(path, f"{width}x{height} = {width * height:,} pixels"))


def _too_large(path: Path, detail: str) -> str:
    return (f"image {path} is over eval's limit of {MAX_IMAGE_PIXELS:,} pixels ({detail}); "
            "refused as a possible decompression bomb: downscale it first")


def _to_rgb(path: Path, im: PILImage.Image) -> PILImage.Image:
    import numpy as np
    from PIL import Image

    if im.mode in _HIGH_BIT_MODES:
        values = np.asarray(im)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"image {path} (mode {im.mode}) has values in [{lo}, {hi}]; eval "
                            "reads integer images as 16-bit (0..65535): convert it to 8 or "
                            "16 bits first")
        # 65535 / 257 = 255 exactly: the 16-bit range maps onto the 8-bit one.
        eight = np.rint(values.astype(np.float32) / 257.0).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float32)
        finite = bool(np.isfinite(values).all())
        if not finite or values.min() < 0.0 or values.max() > 1.0:
            seen = (f"[{values.min():g}, {values.max():g}]" if finite
                    else "NaN or infinite values")
            raise DataError(f"image {path} is a float image with {seen}; eval reads float "
                            "images as intensities in [0, 1]: rescale it or save it as "
                            "8-bit")
        eight = np.rint(values * 255.0).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    return im.convert("RGB")


def _why(e: BaseException) -> str:
    return one_line(str(e)) or type(e).__name__
