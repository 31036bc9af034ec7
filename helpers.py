"""Image preparation, pure functions: upload bytes -> checked image -> uint8 pixels at the model's input size.

Nothing here touches Redis, Flask or Keras, so each step can be called on its own in a test. The queue's
message bytes are image_queue.py's.
"""

import io
import logging
import os
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Formats we decode. Anything else Pillow can identify (EPS, PSD, ICO, ...) is refused with 415.
# MPO is the multi-picture JPEG many phones and cameras write.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
BACKGROUND = (255, 255, 255)  # what transparent pixels become
# Pillow's own cache of freed image memory (its PILLOW_BLOCK_SIZE and PILLOW_BLOCKS_MAX, which win when set):
# up to 16 blocks of 1 MiB kept for the next image. A photo's decoded copy, its resized copy and the pixels
# sent each fit one block; uncached, each is a fresh mmap whose pages fault in again (see
# run_web_server.return_large_blocks_to_the_os): 0.15-0.25 ms of a photo's 1.4-2.4 ms preparation. At most
# 16 MiB stay held per process, however large the images.
BLOCK_BYTES, BLOCKS_KEPT = 1024 * 1024, 16
# A TIFF's strips or tiles: Pillow spends ~10 us of Python on each when it opens and decodes one, so a 4 MB
# upload listing 2 million one-pixel strips took 20 s of CPU for "2 pixels". Real images have far fewer (a
# 50-megapixel RGB image in the usual 8 KB strips: ~18,000; one row per strip and plane: 3 x its height).
TIFF_MAX_SEGMENTS = 65536
ORIENTATION = 0x0112  # the EXIF tag
UPRIGHT = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """The upload cannot be used as an image; the message is for a person."""


class NotAnImage(ImageError):
    """Empty, not an image at all, or corrupt / truncated (400)."""


class UnsupportedImage(ImageError):
    """An image, but in a format the service does not decode (415)."""


class ImageTooLarge(ImageError):
    """More pixels than MAX_IMAGE_PIXELS (413)."""


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb guard an error at our limit, not a warning at its own; keep freed
    image memory for the next image (BLOCKS_KEPT)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    if "PILLOW_BLOCK_SIZE" not in os.environ and "PILLOW_BLOCKS_MAX" not in os.environ:
        Image.core.set_block_size(BLOCK_BYTES)
        Image.core.set_blocks_max(BLOCKS_KEPT)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify an upload from its header alone: format and size are checked before decoding."""
    if not data:
        raise NotAnImage("the image is empty (0 bytes)")
    segments = tiff_segments(data)
    if segments > TIFF_MAX_SEGMENTS:
        raise UnsupportedImage(
            f"the TIFF is cut into {segments:,} strips or tiles, more than {TIFF_MAX_SEGMENTS:,}: save it with "
            "larger strips, or as PNG or JPEG"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"the image has more than {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except MemoryError:
        raise
    except Exception as exc:  # OSError, ValueError, SyntaxError; and any plugin's own (DDS: NotImplementedError)
        raise NotAnImage(f"the image header is corrupt ({short_error(exc)})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(
            f"{image.format} images are not supported; send one of {', '.join(sorted(ACCEPTED_FORMATS))}"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, more than {max_pixels:,} pixels")
    if width < 1 or height < 1:
        raise NotAnImage(f"the image is {width}x{height}")
    return image


# The first bytes of each accepted format: an upload that starts like one but that Pillow cannot open is
# a broken image, not "not an image".
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def signature_kind(data: bytes) -> str | None:
    """The accepted format the upload's first bytes name (WebP or one of SIGNATURES), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def has_accepted_signature(data: bytes) -> bool:
    """Whether the upload starts like a format we decode (JPEG, PNG, GIF, BMP, WebP, TIFF): anything else is
    refused without waiting for a decoder (Trip.prepare)."""
    return signature_kind(data) is not None or data.startswith((b"BM", b"II+\x00", b"MM\x00+"))


def _unidentified(data: bytes) -> ImageError:
    kind = signature_kind(data)
    if kind:
        return NotAnImage(f"the {kind} image is corrupt or truncated (its header cannot be read)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in data[:4096].lower():
        return UnsupportedImage("SVG images are not supported; send a raster image (JPEG, PNG, ...)")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return UnsupportedImage("HEIC/AVIF images are not supported; send JPEG or PNG")
    return NotAnImage("the upload is not an image (send JPEG, PNG, GIF, BMP, WebP or TIFF)")


def tiff_segments(data: bytes) -> int:
    """How many strips or tiles a TIFF upload's first image lists (its header read by hand, before Pillow
    builds a Python tuple for each); 0 for anything else, or a header too broken to say (Pillow then does)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    try:
        magic = struct.unpack_from(order + "H", data, 2)[0] if order else 0
        if magic == 42:  # classic TIFF: 4-byte offsets, 12-byte entries
            (ifd,), count_format, entry_format = struct.unpack_from(order + "I", data, 4), "H", "HHI"
        elif magic == 43:  # BigTIFF: 8-byte offsets, 20-byte entries
            (ifd,), count_format, entry_format = struct.unpack_from(order + "Q", data, 8), "Q", "HHQ"
        else:
            return 0
        (entries,) = struct.unpack_from(order + count_format, data, ifd)
        at, step = ifd + struct.calcsize(count_format), 12 if magic == 42 else 20
        table = data[at : at + min(entries, (len(data) - at) // step) * step]  # every entry (Pillow reads all)
        padded = order + entry_format + ("4x" if magic == 42 else "8x")  # the value (or its offset), unread
        # a tag listed twice counts at its largest: Pillow keeps the last
        return max((count for tag, _, count in struct.iter_unpack(padded, table) if tag in (273, 324)), default=0)
    except struct.error:
        return 0


def short_error(exc: Exception) -> str:
    """An exception as a short phrase for an error message: its text, or its type when it has none."""
    return (str(exc) or type(exc).__name__)[:200]


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Only the orientation is read: ImageOps.exif_transpose
    also writes the EXIF back, and raised on a tag stored with an odd type (a 500 for a phone's photo)."""
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
    except MemoryError:
        raise
    except Exception:  # unreadable EXIF: the pixels are still fine
        return image
    method = UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def decoded_pixels(image: Image.Image, size: tuple[int, int]) -> int:
    """Pixels that decoding this opened image for size (width, height) will produce: its header's size,
    less for a JPEG that decodes at 1/2, 1/4 or 1/8 scale (draft) while still covering size. Nothing is
    decoded yet; prepare_image decodes at the same scale."""
    if image.format in ("JPEG", "MPO"):
        image.draft(None, (max(size), max(size)))  # either orientation still covers the target
    return image.size[0] * image.size[1]


def prepare_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Decode, orient (EXIF), resize to (width, height) and convert to 8-bit RGB: uint8 (h, w, 3).

    Memory stays near one decoded copy of the upload: JPEGs decode at 1/2, 1/4 or 1/8 scale when
    that is still larger than the target, and images are resized before their colours are converted.
    """
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft(None, (max(size), max(size)))  # either orientation still covers the target
        image.load()
        image = upright(image)  # not a copy of the decoded image when already upright
        if image.mode in ("1", "P", "PA"):  # these resize by nearest neighbour: convert first
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        if image.size != size:
            gap = None if image.mode.startswith("I;16") else 3.0  # Pillow cannot reduce() 16-bit images
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=gap)
        pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("the image decodes to too many pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise NotAnImage(f"the image is corrupt or truncated ({short_error(exc)})") from None
    except MemoryError:
        raise
    except Exception as exc:  # a decoder's own surprise: still this upload's fault, but logged in full
        log.warning("an image failed to decode with %s", type(exc).__name__, exc_info=True)
        raise NotAnImage(f"the image is corrupt or truncated ({short_error(exc)})") from None
    return pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode but palette ones (prepare_image converts those first): 16-bit gray
    scaled (not clipped), transparency over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "La":  # gray with premultiplied alpha (TIFF): Pillow converts it to nothing but LA
        image = image.convert("LA")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PNG, TIFF); Pillow widens some to "I". 65535 -> 255.
        gray = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
