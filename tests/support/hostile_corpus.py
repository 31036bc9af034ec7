"""Malformed, hostile and unusual requests for the service, each built byte by byte, and the right answer to each.

    python tests/support/hostile_corpus.py OUTDIR    writes every case to OUTDIR to replay by hand:
        OUTDIR/NAME.http   the exact request bytes:   nc -q 5 127.0.0.1 5000 < OUTDIR/NAME.http
        OUTDIR/NAME.body   its body alone, for curl:  the "curl" line in OUTDIR/index.json (null: use the .http)
        OUTDIR/index.json  every case: what it is, the request, the right status and words

Two kinds of case. Refusals (status 4xx): the answer must be that status, JSON {"success": false, "error": ...}
whose error holds the case's words, never a 5xx. Must-be-served (status 200): a valid but unusual image (CMYK,
16-bit, animated, EXIF-rotated, 1 pixel high, a lying Content-Type, a file name beyond ASCII, ...) that the
service must answer with its predictions, so a refusal is not mistaken for robustness.

Everything is generated here from images/chelsea.jpg and Pillow's own encoders, deterministically (the
same Pillow gives the same bytes), so nothing binary is checked in. Multipart bodies are written by hand:
libraries will not send two "image" fields, a non-UTF-8 file name, a missing closing boundary or a body
that stops short of its Content-Length.
"""

import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]  # the repository
CAT_PATH = ROOT / "images" / "chelsea.jpg"
BOUNDARY = "hostile-corpus-boundary-7d1f"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class Case:
    """One HTTP request and the answer that is right for it."""

    name: str
    why: str
    method: str = "POST"
    target: bytes = b"/predict"  # the request-target exactly as sent: path and query, any bytes
    headers: tuple[tuple[str, str], ...] = ()  # (name, value), sent as Latin-1
    body: bytes = b""
    status: int = 400  # the right answer; 200 for a valid upload that must be served
    words: tuple[str, ...] = ()  # each must appear in the JSON error (any case)
    predictions: int = 5  # how many a 200 answer holds
    send_only: int | None = None  # send this many body bytes of the declared length, then stop sending
    content_length: bool = True  # add "Content-Length: len(body)" (False: the case frames its own body)
    app_answers: bool = True  # False: gunicorn refuses it before the app, with its own HTML page

    @property
    def served(self) -> bool:
        return self.status == 200

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def query(self) -> bytes:
        return self.target.partition(b"?")[2]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def request_bytes(self, host: str = "127.0.0.1") -> bytes:
        """The whole request as it goes on the wire (cut to send_only body bytes when set)."""
        lines = [self.method.encode("latin-1") + b" " + self.target + b" HTTP/1.1", b"Host: " + host.encode()]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in self.headers]
        if self.content_length:
            lines.append(b"Content-Length: %d" % len(self.body))
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body[: self.send_only]


# --- Byte-level builders ------------------------------------------------------------------------


def multipart(*parts: tuple, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/form-data body. Each part: (field name, file name bytes or None, content type or None, data)."""
    out = b""
    for name, filename, content_type, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--" + boundary.encode() + b"\r\n" + disposition + b"\r\n"
        if content_type:
            out += b"Content-Type: " + content_type.encode() + b"\r\n"
        out += b"\r\n" + data + b"\r\n"
    if close:
        out += b"--" + boundary.encode() + b"--\r\n"
    return out


def chunked(body: bytes, size: int = 65536) -> bytes:
    """body in HTTP/1.1 chunked framing."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """The PNG signature and an IHDR chunk, nothing else: a header claiming any size."""
    return PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete 1-bit black PNG: width x height pixels in a file about 1/1000 of their bytes."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_header(width, height, 1, 0) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def tiff_set_tag(data: bytes, tag: int, value: int) -> bytes:
    """A little-endian TIFF with one SHORT/LONG tag of its first IFD set to value."""
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * i
        number, kind = struct.unpack_from("<HH", out, entry)
        if number == tag:
            struct.pack_into("<H" if kind == 3 else "<I", out, entry + 8, value)
            return bytes(out)
    raise ValueError(f"tag {tag} not found")


def jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims width x height; the scan data stays that of the real image."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


# --- Images -------------------------------------------------------------------------------------


@cache
def cat_jpeg() -> bytes:
    """A real photo: a cat, 451x300 JPEG (35 KB)."""
    return CAT_PATH.read_bytes()


@cache
def cat() -> Image.Image:
    return Image.open(io.BytesIO(cat_jpeg())).convert("RGB")


def small(size=(120, 80)) -> Image.Image:
    return cat().resize(size, Image.Resampling.BILINEAR)


@cache
def cat_png() -> bytes:
    return save(small((240, 160)), "PNG")


@cache
def cat_gif() -> bytes:
    return save(small().convert("P"), "GIF")


@cache
def cat_webp() -> bytes:
    return save(small(), "WEBP", quality=80)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(small(), "JPEG", exif=exif)


def exif_rotated_jpeg_with_an_odd_tag() -> bytes:
    """EXIF orientation 6 beside a ResolutionUnit stored as ASCII (it is a SHORT): Pillow's exif_transpose,
    writing the EXIF back, raised struct.error on it (a 500)."""
    entries = [(0x0112, 3, 1, b"\x06\x00"), (0x0128, 2, 3, b"ab\x00")]
    ifd = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    ifd += b"".join(
        struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00") for tag, kind, count, value in entries
    )
    return save(small(), "JPEG", exif=b"Exif\x00\x00" + ifd + struct.pack("<I", 0))


def dds_without_pixel_format() -> bytes:
    """A DDS header whose pixel format flags are 0: Pillow's DDS plugin raises NotImplementedError at open."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0) + bytes(44)
    return b"DDS " + header + bytes(64)


def tiff_of_many_strips(strips: int, padding: int = 0) -> bytes:
    """A 1 x 2 gray TIFF listing `strips` one-byte strips: Pillow spends ~10 us of Python on each, at open and
    again at decode (2 million of them, 4 MB, took 20 s of CPU). padding: that many dummy entries (tag 254)
    before the strips' (a check that read the first 4096 entries only missed them)."""
    offsets_at, ifd_at = 16, 16 + 2 * strips
    entries = [(256, 1), (257, 2), (258, 8), (259, 1), (262, 1), (277, 1), (278, 1), (279, 1)]
    ifd = [struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in entries]
    ifd.insert(5, struct.pack("<HHII", 273, 3, strips, offsets_at))  # StripOffsets, in tag order
    ifd[:0] = [struct.pack("<HHIHH", 254, 3, 1, 0, 0)] * padding
    head = b"II*\x00" + struct.pack("<I", ifd_at) + b"\x80" * 8 + struct.pack(f"<{strips}H", *[8] * strips)
    return head + struct.pack("<H", len(ifd)) + b"".join(ifd) + struct.pack("<I", 0)


def animated_gif() -> bytes:
    frames = [small().rotate(angle).convert("P") for angle in (0, 90, 180)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiff_gray_with_associated_alpha() -> bytes:
    """Grayscale + premultiplied (associated) alpha, ExtraSamples = 1: Pillow opens it as mode "La"."""
    return tiff_set_tag(save(small().convert("LA"), "TIFF"), 338, 1)


def sixteen_bit() -> Image.Image:
    """16-bit gray (mode I;16) over the whole 0-65535 range."""
    return Image.fromarray(np.asarray(small().convert("L"), dtype=np.uint16) * 257)


def float_gray() -> Image.Image:
    """32-bit float gray (mode F), 0.0-255.0."""
    return Image.fromarray(np.asarray(small().convert("L"), dtype=np.float32))


def huge_gif_screen() -> bytes:
    """A 1x1 GIF whose logical screen (Pillow's image size) claims 30000 x 30000."""
    data = bytearray(save(Image.new("P", (1, 1)), "GIF"))
    struct.pack_into("<HH", data, 6, 30000, 30000)
    return bytes(data)


def huge_bmp() -> bytes:
    """A 2x2 BMP whose info header claims 50000 x 50000."""
    data = bytearray(save(Image.new("RGB", (2, 2)), "BMP"))
    struct.pack_into("<ii", data, 18, 50000, 50000)
    return bytes(data)


def png_with_ztxt_bomb() -> bytes:
    """A valid small PNG with a compressed text chunk that inflates to 64 MB (Pillow stops at 1 MB)."""
    png = cat_png()
    bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9))
    return png[:33] + bomb + png[33:]  # after the IHDR chunk


def flipped(data: bytes, start: int, length: int) -> bytes:
    return data[:start] + bytes(b ^ 0x55 for b in data[start : start + length]) + data[start + length :]


# --- The corpus ---------------------------------------------------------------------------------


def upload(name: str, why: str, data: bytes, filename: bytes = b"photo.jpg", content_type="image/jpeg", **expect):
    """A multipart form with one "image" file."""
    body = multipart(("image", filename, content_type, data))
    return Case(name, why, headers=(("Content-Type", MULTIPART),), body=body, **expect)


def raw(name: str, why: str, data: bytes, content_type: str = "image/jpeg", **expect) -> Case:
    """The image as the request body."""
    return Case(name, why, headers=(("Content-Type", content_type),), body=data, **expect)


def form(name: str, why: str, *parts: tuple, boundary: str = BOUNDARY, close: bool = True, **expect) -> Case:
    body = multipart(*parts, boundary=boundary, close=close)
    return Case(name, why, headers=(("Content-Type", MULTIPART),), body=body, **expect)


CORRUPT = ("corrupt",)
NOT_AN_IMAGE = ("not an image",)
TOO_MANY_PIXELS = ("pixels",)
NOT_ALLOWED = ("not allowed",)


def build_corpus(max_upload_mb: float = 2) -> list[Case]:
    """Every case, for a service whose MAX_UPLOAD_MB is max_upload_mb (MAX_IMAGE_PIXELS at its 50 M default)."""
    jpeg, png, gif, webp = cat_jpeg(), cat_png(), cat_gif(), cat_webp()
    scan = jpeg.index(b"\xff\xda")  # start of the JPEG's scan data
    over_limit = int(max_upload_mb * 1024 * 1024) + 1024
    too_large = (f"larger than {max_upload_mb:g} MB",)
    cases = [
        # Empty and tiny
        upload("empty-file", "a form with a 0-byte image file", b"", words=("empty",)),
        raw("empty-body", "a raw image body of 0 bytes", b"", words=("empty",)),
        upload("one-byte", "a single byte", b"\xff", words=NOT_AN_IMAGE),
        upload("jpeg-magic-only", "the 3 bytes that start every JPEG", b"\xff\xd8\xff", words=CORRUPT),
        upload("png-signature-only", "the 8-byte PNG signature, nothing after it", PNG_SIGNATURE, words=CORRUPT),
        # Truncated, at several points
        upload("jpeg-cut-in-header", "a JPEG cut at byte 300, inside its headers", jpeg[:300], words=CORRUPT),
        upload("jpeg-cut-at-scan", "a JPEG cut where its scan data starts", jpeg[:scan], words=CORRUPT),
        upload("jpeg-cut-in-half", "a JPEG cut in the middle of its scan data", jpeg[: len(jpeg) // 2], words=CORRUPT),
        upload("jpeg-cut-near-end", "a JPEG missing its last 100 bytes", jpeg[:-100], words=CORRUPT),
        upload("png-cut-after-header", "a PNG cut right after its IHDR chunk", png[:33], words=CORRUPT),
        upload("png-cut-in-idat", "a PNG cut inside its first IDAT chunk", png[:200], words=CORRUPT),
        upload("png-cut-in-half", "a PNG cut in the middle of its pixel data", png[: len(png) // 2], words=CORRUPT),
        upload("gif-cut-after-screen", "a GIF cut after its logical screen", gif[:13], words=CORRUPT),
        upload("gif-cut-in-half", "a GIF cut in the middle of its pixel data", gif[: len(gif) // 2], words=CORRUPT),
        upload("webp-cut-after-riff", "a WebP cut after its RIFF header", webp[:12], words=CORRUPT),
        upload("webp-cut-in-half", "a WebP cut in the middle", webp[: len(webp) // 2], words=CORRUPT),
        upload("bmp-cut-in-half", "a BMP cut in the middle", save(small(), "BMP")[:15000], words=CORRUPT),
        upload("tiff-cut-in-half", "a TIFF cut in the middle", save(small(), "TIFF")[:15000], words=CORRUPT),
        # Corrupt
        upload(
            "jpeg-scan-data-corrupted",
            "200 bytes flipped in the middle of the scan data",
            flipped(jpeg, (scan + len(jpeg)) // 2, 200),
            words=CORRUPT,
        ),
        upload(
            "png-bad-header-crc",
            "a PNG whose IHDR checksum is wrong",
            png[:29] + struct.pack(">I", zlib.crc32(png[12:29]) ^ 1) + png[33:],
            words=CORRUPT,
        ),
        upload("png-header-only", "a PNG with a valid 64x64 IHDR and no pixel data", png_header(64, 64), words=CORRUPT),
        upload("png-zero-width", "a PNG header claiming 0 x 64", png_header(0, 64), words=CORRUPT),
        upload("png-text-bomb", "a zTXt chunk inflating to 64 MB", png_with_ztxt_bomb(), words=CORRUPT),
        # Too many pixels: refused from the header, before decoding
        upload(
            "png-claims-30000x30000",
            "a PNG header claiming 900 M pixels, then 20 bytes of pixel data",
            png_header(30000, 30000) + png_chunk(b"IDAT", zlib.compress(bytes(100))) + png_chunk(b"IEND", b""),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "png-ihdr-only-30000x30000",
            "a PNG signature and an IHDR claiming 900 M pixels, nothing else",
            png_header(30000, 30000),
            words=CORRUPT,
        ),
        upload(
            "png-bomb-20000x20000",
            "a complete 1-bit PNG of 400 M pixels in 49 KB",
            png_bomb(20000, 20000),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "png-bomb-8000x8000",
            "a complete 64 M-pixel PNG: over the 50 M limit but under twice it, where "
            "Pillow on its own would only warn",
            png_bomb(8000, 8000),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "jpeg-claims-65000x65000",
            "a JPEG frame header claiming 4.2 G pixels",
            jpeg_claiming(jpeg, 65000, 65000),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "gif-screen-30000x30000",
            "a 1x1 GIF whose logical screen is 30000 x 30000",
            huge_gif_screen(),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "tiff-claims-65535x65535",
            "a TIFF whose width and length tags claim 4.3 G pixels",
            tiff_set_tag(tiff_set_tag(save(small(), "TIFF"), 256, 65535), 257, 65535),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        upload(
            "bmp-claims-50000x50000",
            "a BMP header claiming 2.5 G pixels",
            huge_bmp(),
            status=413,
            words=TOO_MANY_PIXELS,
        ),
        # Not images, or formats we do not decode
        upload(
            "svg",
            "an SVG drawing",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            filename=b"drawing.svg",
            content_type="image/svg+xml",
            status=415,
            words=("SVG",),
        ),
        raw(
            "svg-with-xml-prolog",
            "an SVG with an XML declaration, as a raw body",
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><rect width="1" height="1"/></svg>',
            content_type="image/svg+xml",
            status=415,
            words=("SVG",),
        ),
        upload(
            "heic",
            "an HEIC file's ftyp box",
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
            filename=b"IMG_0001.HEIC",
            content_type="image/heic",
            status=415,
            words=("HEIC",),
        ),
        upload(
            "avif",
            "a real AVIF image",
            save(small(), "AVIF"),
            filename=b"photo.avif",
            content_type="image/avif",
            status=415,
            words=("AVIF", "not supported"),
        ),
        upload(
            "ico",
            "a Windows icon",
            save(small((32, 32)), "ICO"),
            filename=b"favicon.ico",
            status=415,
            words=("ICO", "not supported"),
        ),
        upload(
            "jpeg2000",
            "a JPEG 2000 image",
            save(small(), "JPEG2000"),
            filename=b"photo.jp2",
            status=415,
            words=("not supported",),
        ),
        upload(
            "dds-no-pixel-format",
            "a DDS texture header whose pixel format Pillow's plugin does not implement",
            dds_without_pixel_format(),
            filename=b"texture.dds",
            words=CORRUPT,
        ),
        upload(
            "tiff-100000-strips",
            "a 1 x 2 TIFF listing 100,000 one-byte strips (200 KB): refused before Pillow reads them",
            tiff_of_many_strips(100_000),
            filename=b"x.tif",
            status=415,
            words=("100,000 strips",),
        ),
        upload(
            "tiff-100000-strips-after-4100-entries",
            "the same, its strips listed after 4,100 dummy entries of its first IFD",
            tiff_of_many_strips(100_000, padding=4100),
            filename=b"x.tif",
            status=415,
            words=("100,000 strips",),
        ),
        upload(
            "html",
            "an HTML page",
            b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
            filename=b"page.html",
            content_type="text/html",
            words=NOT_AN_IMAGE,
        ),
        upload(
            "pdf",
            "a PDF document",
            b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF",
            filename=b"doc.pdf",
            content_type="application/pdf",
            words=NOT_AN_IMAGE,
        ),
        upload(
            "zip",
            "a ZIP archive",
            b"PK\x03\x04" + bytes(26) + b"PK\x05\x06" + bytes(18),
            filename=b"photos.zip",
            content_type="application/zip",
            words=NOT_AN_IMAGE,
        ),
        upload(
            "text-named-jpg",
            "a text file named .jpg and sent as image/jpeg",
            b"these are not the pixels\n" * 20,
            words=NOT_AN_IMAGE,
        ),
        upload(
            "non-utf8-filename",
            "a real photo under a Latin-1 file name: form part headers must be UTF-8 "
            "(RFC 7578), and werkzeug cannot read the form",
            jpeg,
            filename=b"f\xe9vrier \xff\xfe.jpg",
            words=("not UTF-8",),
        ),
        # Wrong request shape
        raw(
            "json-body",
            "a JSON body",
            b'{"image": "https://example.com/cat.jpg"}',
            content_type="application/json",
            words=("no image",),
        ),
        raw(
            "jpeg-as-text-plain",
            "a real JPEG body labelled text/plain",
            jpeg,
            content_type="text/plain",
            words=("no image",),
        ),
        raw(
            "urlencoded-form",
            "image=... as a URL-encoded form",
            b"image=%FF%D8%FF%E0",
            content_type="application/x-www-form-urlencoded",
            words=("no image",),
        ),
        Case("no-content-type", "a JPEG body with no Content-Type at all", body=jpeg, words=("no image",)),
        form(
            "wrong-field-name",
            "the file under the field 'photo'",
            ("photo", b"cat.jpg", "image/jpeg", jpeg),
            words=("no 'image' field", "photo"),
        ),
        form(
            "image-as-text-value",
            "field 'image' as a plain form value, not a file (curl -F image=photo.jpg)",
            ("image", None, None, b"photo.jpg"),
            words=("'image' field is text, not a file",),
        ),
        form(
            "two-image-fields",
            "two files under 'image'",
            ("image", b"a.jpg", "image/jpeg", jpeg),
            ("image", b"b.jpg", "image/jpeg", jpeg),
            words=("one image",),
        ),
        form(
            "empty-filename-no-content",
            "what a browser sends when no file was chosen",
            ("image", b"", "application/octet-stream", b""),
            words=("empty",),
        ),
        form("empty-form", "a multipart form with no fields", words=("no 'image' field",)),
        form(
            "no-closing-boundary",
            "a form whose closing boundary never comes",
            ("image", b"cat.jpg", "image/jpeg", jpeg),
            close=False,
            words=("malformed or cut short",),
        ),
        Case(
            "boundary-never-appears",
            "the body uses a boundary other than the declared one",
            headers=(("Content-Type", MULTIPART),),
            body=multipart(("image", b"cat.jpg", "image/jpeg", jpeg), boundary="some-other-boundary"),
            words=("malformed",),
        ),
        Case(
            "multipart-without-boundary",
            "Content-Type multipart/form-data with no boundary parameter",
            headers=(("Content-Type", "multipart/form-data"),),
            body=multipart(("image", b"c.jpg", None, jpeg)),
            words=("malformed", "boundary"),
        ),
        # Bodies over MAX_UPLOAD_MB, or cut short
        raw(
            "raw-body-over-limit",
            f"a raw body 1 KB over {max_upload_mb:g} MB",
            b"\xff\xd8\xff" + bytes(over_limit),
            status=413,
            words=too_large,
        ),
        upload(
            "multipart-over-limit",
            f"a form whose file makes it 1 KB over {max_upload_mb:g} MB",
            jpeg + bytes(over_limit),
            status=413,
            words=too_large,
        ),
        Case(
            "chunked-over-limit",
            f"a chunked raw body (no Content-Length) 1 KB over {max_upload_mb:g} MB",
            headers=(("Content-Type", "image/jpeg"), ("Transfer-Encoding", "chunked")),
            body=chunked(jpeg + bytes(over_limit)),
            content_length=False,
            status=413,
            words=too_large,
        ),
        Case(
            "multipart-cut-short",
            "a form sent halfway, its Content-Length promising the rest",
            headers=(("Content-Type", MULTIPART),),
            body=multipart(("image", b"cat.jpg", "image/jpeg", jpeg)),
            send_only=len(jpeg) // 2,
            words=("cut short",),
        ),
        Case(
            "raw-body-cut-short",
            "a raw JPEG body sent halfway, its Content-Length promising the rest",
            headers=(("Content-Type", "image/jpeg"),),
            body=jpeg,
            send_only=len(jpeg) // 2,
            words=("cut short",),
        ),
        # Wrong methods and paths
        Case("get-predict", "GET on /predict", method="GET", status=405, words=NOT_ALLOWED),
        Case(
            "put-predict",
            "PUT on /predict with an image",
            method="PUT",
            headers=(("Content-Type", "image/jpeg"),),
            body=jpeg,
            status=405,
            words=NOT_ALLOWED,
        ),
        Case("delete-predict", "DELETE on /predict", method="DELETE", status=405, words=NOT_ALLOWED),
        Case("patch-predict", "PATCH on /predict", method="PATCH", status=405, words=NOT_ALLOWED),
        Case("post-healthz", "POST on /healthz", target=b"/healthz", status=405, words=NOT_ALLOWED),
        Case("post-readyz", "POST on /readyz", target=b"/readyz", status=405, words=NOT_ALLOWED),
        Case(
            "unknown-path",
            "GET on a path that does not exist",
            method="GET",
            target=b"/nowhere",
            status=404,
            words=("not found",),
        ),
        upload(
            "predict-trailing-slash",
            "POST on /predict/ (with a slash)",
            jpeg,
            target=b"/predict/",
            status=404,
            words=("not found",),
        ),
        # Bad ?top=
        *(
            upload(f"top-{label}", f"?top={shown}", jpeg, target=b"/predict?top=" + value, words=("top must be",))
            for label, value, shown in (
                ("zero", b"0", "0"),
                ("21", b"21", "21"),
                ("negative", b"-1", "-1"),
                ("word", b"five", "five"),
                ("empty", b"", ""),
                ("float", b"2.5", "2.5"),
                ("huge", b"9" * 400, "9 x 400"),
                ("percent-ff", b"%FF%FE", "%FF%FE: bytes that are not UTF-8"),
            )
        ),
        # Unusual but valid: these must be served
        upload("cmyk-jpeg", "a CMYK JPEG (print workflows)", save(small().convert("CMYK"), "JPEG"), status=200),
        upload(
            "exif-rotated-jpeg-odd-tag",
            "a JPEG with EXIF orientation 6 and a ResolutionUnit stored as text: the pixels are fine",
            exif_rotated_jpeg_with_an_odd_tag(),
            status=200,
        ),
        upload("grayscale-jpeg", "an 8-bit grayscale JPEG", save(small().convert("L"), "JPEG"), status=200),
        upload("progressive-jpeg", "a progressive JPEG", save(small(), "JPEG", progressive=True), status=200),
        upload(
            "exif-rotated-jpeg", "a JPEG with EXIF orientation 6 (phone held upright)", exif_rotated_jpeg(), status=200
        ),
        upload(
            "jpeg-zeroed-scan-data",
            "2000 zero bytes in the scan data: libjpeg recovers, as browsers do",
            jpeg[: (scan + len(jpeg)) // 2] + bytes(2000) + jpeg[(scan + len(jpeg)) // 2 + 2000 :],
            status=200,
        ),
        upload("png-16-bit-gray", "a 16-bit grayscale PNG", save(sixteen_bit(), "PNG"), filename=b"x.png", status=200),
        upload(
            "tiff-16-bit-gray", "a 16-bit grayscale TIFF", save(sixteen_bit(), "TIFF"), filename=b"x.tif", status=200
        ),
        upload("tiff-32-bit-float", "a 32-bit float TIFF", save(float_gray(), "TIFF"), status=200),
        upload(
            "tiff-gray-associated-alpha",
            "a grayscale TIFF with premultiplied alpha (Pillow mode La)",
            tiff_gray_with_associated_alpha(),
            filename=b"x.tif",
            status=200,
        ),
        upload(
            "png-palette-transparency",
            "a palette PNG with a transparent colour",
            save(small().convert("P"), "PNG", transparency=0),
            status=200,
        ),
        upload("png-gray-alpha", "a grayscale + alpha PNG", save(small().convert("LA"), "PNG"), status=200),
        upload("png-rgba", "an RGBA PNG", save(small().convert("RGBA"), "PNG"), status=200),
        upload("png-1-bit", "a 1-bit black-and-white PNG", save(small().convert("1"), "PNG"), status=200),
        upload("png-without-iend", "a PNG missing its final IEND chunk", png[:-12], status=200),
        upload("png-1x1", "a 1 x 1 pixel PNG", save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), status=200),
        upload("png-10000x1", "a 10000 x 1 pixel PNG", save(small((10000, 1)), "PNG"), status=200),
        upload("png-1x10000", "a 1 x 10000 pixel PNG", save(small((1, 10000)), "PNG"), status=200),
        upload(
            "animated-gif",
            "a 3-frame animated GIF: the first frame is classified",
            animated_gif(),
            filename=b"anim.gif",
            status=200,
        ),
        upload("webp", "a lossy WebP", webp, filename=b"x.webp", content_type="image/webp", status=200),
        upload("bmp", "a BMP", save(small(), "BMP"), filename=b"x.bmp", status=200),
        upload(
            "mpo",
            "a two-frame MPO (what many cameras write)",
            save(small(), "MPO", save_all=True, append_images=[small().rotate(180)]),
            status=200,
        ),
        upload(
            "utf8-filename",
            "a real photo whose file name is UTF-8 beyond ASCII",
            jpeg,
            filename="février 猫 ✓.jpg".encode(),
            status=200,
        ),
        upload(
            "png-named-gif",
            "a PNG under a .gif name and the part type image/gif",
            png,
            filename=b"cat.gif",
            content_type="image/gif",
            status=200,
        ),
        upload(
            "part-type-text-plain",
            "a real JPEG whose form part says text/plain",
            jpeg,
            content_type="text/plain",
            status=200,
        ),
        raw("raw-png-labelled-jpeg", "a raw PNG body sent with Content-Type image/jpeg", png, status=200),
        raw(
            "raw-octet-stream",
            "a raw JPEG body sent as application/octet-stream",
            jpeg,
            content_type="application/octet-stream",
            status=200,
        ),
        form(
            "extra-fields",
            "the image plus other text and file fields",
            ("note", None, None, b"hello"),
            ("image", b"cat.jpg", "image/jpeg", jpeg),
            ("thumbnail", b"t.png", "image/png", png),
            status=200,
        ),
        # gunicorn answers these itself, before the app, with an HTML page (see the README: put nginx in front)
        Case(
            "header-too-large",
            "one 16 KB header (gunicorn's limit is 8190 bytes)",
            method="GET",
            target=b"/healthz",
            headers=(("X-Padding", "a" * 16384),),
            status=431,
            app_answers=False,
        ),
        Case(
            "too-many-headers",
            "150 headers (gunicorn's limit is 100)",
            method="GET",
            target=b"/healthz",
            headers=tuple((f"X-H{i}", "1") for i in range(150)),
            status=431,
            app_answers=False,
        ),
        Case(
            "request-line-too-long",
            "an 8 KB request-target (gunicorn's limit is 4094 bytes)",
            method="GET",
            target=b"/healthz?" + b"a" * 8192,
            status=414,
            app_answers=False,
        ),
        Case(
            "bad-content-length",
            "Content-Length: abc",
            headers=(("Content-Type", "image/jpeg"), ("Content-Length", "abc")),
            body=jpeg[:100],
            content_length=False,
            app_answers=False,
        ),
        Case(
            "raw-ff-byte-in-query",
            "a raw 0xFF byte in the request-target",
            target=b"/predict?top=\xff",
            app_answers=False,
        ),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def curl_line(case: Case, body_file: str) -> str | None:
    """A curl command that sends the same request, or None where only the .http file can (a body cut short,
    a body framed by hand, raw bytes in the target, headers curl would not send as they are)."""
    if case.send_only is not None or not case.content_length or not case.target.isascii() or not case.app_answers:
        return None
    parts = ["curl", "-sS", "-X", case.method, *(f"-H '{name}: {value}'" for name, value in case.headers)]
    if case.body:
        parts += [f"--data-binary @{body_file}"] + ([] if case.header("Content-Type") else ["-H 'Content-Type:'"])
    parts.append(f"'http://127.0.0.1:5000{case.target.decode()}'")
    return " ".join(parts)


def write_corpus(outdir: Path) -> list[Case]:
    cases = build_corpus()
    outdir.mkdir(parents=True, exist_ok=True)
    index = []
    for case in cases:
        (outdir / f"{case.name}.body").write_bytes(case.body)
        (outdir / f"{case.name}.http").write_bytes(case.request_bytes())
        index.append(
            {
                "name": case.name,
                "why": case.why,
                "method": case.method,
                "target": case.target.decode("latin-1"),
                "headers": [[k, v if len(v) < 200 else f"<{len(v)} characters>"] for k, v in case.headers],
                "body_bytes": len(case.body),
                "sent_body_bytes": len(case.body[: case.send_only]),
                "status": case.status,
                "words": list(case.words),
                "predictions": case.predictions if case.served else None,
                "answered_by": "app (JSON)" if case.app_answers else "gunicorn (HTML)",
                "http_file": f"{case.name}.http",
                "curl": curl_line(case, f"{case.name}.body"),
            }
        )
    (outdir / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=True) + "\n")
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    written = write_corpus(Path(sys.argv[1]))
    refused = sum(not c.served for c in written)
    print(f"{len(written)} cases ({refused} to refuse, {len(written) - refused} to serve) in {sys.argv[1]}")
