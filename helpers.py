"""Pure functions: upload bytes -> checked image -> uint8 pixels, and the queue's message formats.

Nothing here touches Redis, Flask or Keras, so each step can be called on its own in a test.

Queue message (web -> model worker): a one-line JSON header, UTF-8, "id" first, then a newline, then
the raw pixel bytes (row-major height x width x RGB):
    {"id": "<32 hex chars>", "deadline": <Unix seconds, Redis server clock>, "top": <int>,
     "shape": [height, width, 3], "dtype": "uint8"}\n<height * width * 3 bytes>
    A 224 x 224 image is 150,528 pixel bytes, ~150.6 KB with the header. The earlier format, one JSON
    object with the pixels in base64 under "data", was a third larger and cost ~1 ms of CPU per message;
    workers still read it, so they can be upgraded before the web boxes (old workers cannot read this one).

Answer (model worker -> web), one JSON object pushed on the request's own result key:
    {"predictions": [{"label": "tabby", "probability": 0.93}, ...],
     "batch_size": <images in the forward pass>, "inference_ms": <its duration>,
     "claimed": <Unix seconds on the Redis clock when the worker took the message>}   on success
    {"error": "<for a person>", "status": <HTTP status>}                           on failure
"""

import binascii
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we decode. Anything else Pillow can identify (EPS, PSD, ICO, ...) is refused with 415.
# MPO is the multi-picture JPEG many phones and cameras write.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
BACKGROUND = (255, 255, 255)  # what transparent pixels become


class ImageError(ValueError):
    """The upload cannot be used as an image; the message is for a person."""


class NotAnImage(ImageError):
    """Empty, not an image at all, or corrupt / truncated (400)."""


class UnsupportedImage(ImageError):
    """An image, but in a format the service does not decode (415)."""


class ImageTooLarge(ImageError):
    """More pixels than MAX_IMAGE_PIXELS (413)."""


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb guard an error at our limit, not a warning at its own."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify an upload from its header alone: format and size are checked before decoding."""
    if not data:
        raise NotAnImage("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"the image has more than {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise NotAnImage(f"the image header is corrupt ({exc})") from None
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


def _unidentified(data: bytes) -> ImageError:
    kind = "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None
    kind = kind or next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)
    if kind:
        return NotAnImage(f"the {kind} image is corrupt or truncated (its header cannot be read)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in data[:4096].lower():
        return UnsupportedImage("SVG images are not supported; send a raster image (JPEG, PNG, ...)")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return UnsupportedImage("HEIC/AVIF images are not supported; send JPEG or PNG")
    return NotAnImage("the upload is not an image (send JPEG, PNG, GIF, BMP, WebP or TIFF)")


def prepare_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Decode, orient (EXIF), resize to (width, height) and convert to 8-bit RGB: uint8 (h, w, 3).

    Memory stays near one decoded copy of the upload: JPEGs decode at 1/2, 1/4 or 1/8 scale when
    that is still larger than the target, and images are resized before their colours are converted.
    """
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft(None, (max(size), max(size)))  # either orientation still covers the target
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("1", "P", "PA"):  # these resize by nearest neighbour: convert first
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        if image.size != size:
            gap = None if image.mode.startswith("I;16") else 3.0  # Pillow cannot reduce() 16-bit images
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=gap)
        pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("the image decodes to too many pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise NotAnImage(f"the image is corrupt or truncated ({exc})") from None
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


# --- Queue messages ----------------------------------------------------------------------------


class MessageError(ValueError):
    """A queue message that cannot be used; request_id is set when it could be read."""

    def __init__(self, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.request_id = request_id


@dataclass(frozen=True)
class Message:
    request_id: str
    deadline: float  # Unix seconds on the Redis server's clock
    top: int
    pixels: np.ndarray  # uint8 (height, width, 3)


def encode_message(request_id: str, deadline: float, top: int, pixels: np.ndarray) -> bytes:
    """The queue message for one prepared image (format in the module docstring)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be uint8 (h, w, c), got {pixels.dtype} {pixels.shape}")
    header = {"id": request_id, "deadline": deadline, "top": top, "shape": list(pixels.shape), "dtype": "uint8"}
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + np.ascontiguousarray(pixels).tobytes()


def decode_message(raw: bytes) -> Message:
    """Parse and check a queue message; MessageError says what is wrong with it.

    The pixels are a read-only view of raw, not a copy.
    """
    end = raw.find(b"\n")
    header = raw if end < 0 else raw[:end]  # no newline: the earlier all-JSON format, or no pixels
    try:
        body = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise MessageError("the header is not JSON") from None
    if not isinstance(body, dict):
        raise MessageError("not a JSON object")
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise MessageError("no request id")
    try:
        deadline = float(body["deadline"])
        top = int(body["top"])
        shape = tuple(int(n) for n in body["shape"])
        dtype = body["dtype"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
        raise MessageError(f"bad or missing field ({exc})", request_id) from None
    if dtype != "uint8":
        raise MessageError(f"dtype must be uint8, got {dtype!r}", request_id)
    if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
        raise MessageError(f"shape must be [height, width, 3], got {list(shape)}", request_id)
    if end < 0 and "data" in body:  # the earlier format: base64 pixels inside the JSON
        try:
            raw, end = b"\n" + binascii.a2b_base64(body["data"], strict_mode=True), 0
        except (TypeError, ValueError, binascii.Error) as exc:
            raise MessageError(f"bad base64 pixels ({exc})", request_id) from None
    size = 0 if end < 0 else len(raw) - end - 1
    if size != shape[0] * shape[1] * shape[2]:
        raise MessageError(f"{size} pixel bytes do not fill shape {list(shape)}", request_id)
    if top < 1:
        raise MessageError(f"top must be at least 1, got {top}", request_id)
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=end + 1).reshape(shape)
    return Message(request_id, deadline, top, pixels)


def encode_answer(predictions: list[dict], batch_size: int, inference_ms: float, claimed: float | None = None) -> bytes:
    """claimed: when the worker took the message, Unix seconds on the Redis clock (the web derives queue wait)."""
    body = {"predictions": predictions, "batch_size": batch_size, "inference_ms": round(inference_ms, 2)}
    if claimed is not None:
        body["claimed"] = round(claimed, 4)
    return json.dumps(body).encode("utf-8")


def encode_error(status: int, error: str) -> bytes:
    return json.dumps({"error": error, "status": status}).encode("utf-8")


def decode_answer(raw: bytes) -> dict:
    return json.loads(raw)
