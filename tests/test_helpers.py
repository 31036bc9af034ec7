"""Image preparation: pure functions, real images, no services."""

import io

import numpy as np
import pytest
from PIL import Image
from support.images import encode, photo

import helpers

SIZE = (224, 224)
MAX_PIXELS = 50_000_000


@pytest.fixture(autouse=True)
def pillow_limit():
    """Pillow's bomb limit is process-wide and an app built by an earlier test may have lowered it:
    set ours, as the web process does at start (this made a 12-megapixel test fail by test order)."""
    helpers.configure_pillow(MAX_PIXELS)


def prepare(data: bytes, size=SIZE) -> np.ndarray:
    return helpers.prepare_image(helpers.open_image(data, MAX_PIXELS), size)


def quadrants(top_left, top_right, bottom_left, bottom_right, size=(80, 40)) -> Image.Image:
    """An RGB image whose four quadrants have the given colours (size is width, height)."""
    w, h = size
    image = Image.new("RGB", size)
    for color, box in zip(
        (top_left, top_right, bottom_left, bottom_right),
        ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)),
        strict=True,
    ):
        image.paste(color, box)
    return image


def corner_colors(pixels: np.ndarray) -> list[tuple]:
    h, w, _ = pixels.shape
    points = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(c) for c in pixels[y, x]) for y, x in points]


def close(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- Image preparation ------------------------------------------------------------------------


def test_rgb_jpeg_is_resized_to_uint8_of_the_model_size():
    pixels = prepare(encode(photo("chelsea"), "JPEG"), (299, 199))
    assert pixels.dtype == np.uint8 and pixels.shape == (199, 299, 3)
    assert 60 < pixels.mean() < 200  # a real photo, not black or white


def test_same_photo_as_png_and_jpeg_gives_nearly_the_same_pixels():
    png, jpeg = prepare(encode(photo("coffee"), "PNG")), prepare(encode(photo("coffee"), "JPEG", quality=95))
    assert np.abs(png.astype(int) - jpeg.astype(int)).mean() < 3


def test_rgba_transparency_becomes_white_and_opaque_pixels_stay():
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (0, 0, 40, 20))  # top half fully transparent blue
    pixels = prepare(encode(image, "PNG"), (40, 40))
    assert close(pixels[5, 5], (255, 255, 255), 0)
    assert close(pixels[30, 30], (255, 0, 0), 0)


def test_grayscale_becomes_three_equal_channels():
    gray = photo("chelsea").convert("L")
    pixels = prepare(encode(gray, "PNG"))
    assert pixels.shape == (224, 224, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_palette_image_keeps_its_colours():
    image = quadrants((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)).convert("P", palette=Image.ADAPTIVE)
    assert image.mode == "P"
    pixels = prepare(encode(image, "GIF"), (80, 40))
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    assert all(close(got, want) for got, want in zip(corner_colors(pixels), expected, strict=True))


def test_palette_transparency_becomes_white():
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(0, (0, 0, 20, 10))
    pixels = prepare(encode(image, "PNG", transparency=0), (20, 20))
    assert close(pixels[2, 2], (255, 255, 255), 0) and close(pixels[15, 15], (200, 30, 30), 0)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped():
    levels = np.array([[0, 16384, 40000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit
    pixels = prepare(data, (4, 4))
    assert pixels[0, :, 0].tolist() == [0, 64, 156, 255]  # x / 257, where a naive convert clips to 255


def test_cmyk_jpeg_becomes_rgb():
    cmyk = quadrants((255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = prepare(data, (80, 40))
    expected = [(255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]
    assert all(close(got, want, 20) for got, want in zip(corner_colors(pixels), expected, strict=True))


@pytest.mark.parametrize(
    ("orientation", "size", "expected"),
    [
        # Stored quadrants: red, green / blue, yellow. Displayed after the EXIF rotation:
        (1, (80, 40), [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]),
        (3, (80, 40), [(255, 255, 0), (0, 0, 255), (0, 255, 0), (255, 0, 0)]),  # 180 degrees
        (6, (40, 80), [(0, 0, 255), (255, 0, 0), (255, 255, 0), (0, 255, 0)]),  # 90 clockwise
        (8, (40, 80), [(0, 255, 0), (255, 255, 0), (255, 0, 0), (0, 0, 255)]),  # 90 anticlockwise
    ],
)
def test_exif_orientation_is_applied(orientation, size, expected):
    image = quadrants((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = prepare(encode(image, "JPEG", quality=95, exif=exif), size)
    assert all(close(got, want, 20) for got, want in zip(corner_colors(pixels), expected, strict=True))


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = prepare(buf.getvalue(), (16, 16))
    assert close(pixels[8, 8], (255, 0, 0), 8)


# --- Refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", helpers.NotAnImage),
        (b"hello, this is text in a file named photo.jpg\n", helpers.NotAnImage),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', helpers.UnsupportedImage),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, helpers.UnsupportedImage),
    ],
)
def test_non_images_are_refused_by_kind(data, error):
    with pytest.raises(error):
        helpers.open_image(data, MAX_PIXELS)


def test_a_format_pillow_knows_but_we_do_not_decode_is_415():
    with pytest.raises(helpers.UnsupportedImage, match="ICO"):
        helpers.open_image(encode(Image.new("RGB", (32, 32)), "ICO"), MAX_PIXELS)


def test_truncated_jpeg_is_refused_when_decoded():
    data = encode(photo("chelsea"), "JPEG")
    image = helpers.open_image(data[: len(data) // 3], MAX_PIXELS)  # the header is intact
    with pytest.raises(helpers.NotAnImage, match="truncated"):
        helpers.prepare_image(image, SIZE)


def test_too_many_pixels_is_refused_before_decoding():
    data = encode(Image.new("L", (4000, 3000)), "PNG", optimize=True)
    assert len(data) < 100_000  # a small file that would decode to 12 megapixels
    with pytest.raises(helpers.ImageTooLarge, match="pixels"):
        helpers.open_image(data, max_pixels=10_000_000)


def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode():
    big = photo("astronaut").resize((2400, 2400))  # draft() will decode this at 1/8 scale
    data = encode(big, "JPEG", quality=95)
    fast = prepare(data)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4


def test_a_large_16_bit_image_is_scaled_and_resized():
    levels = np.zeros((3000, 4000), np.uint16)
    levels[:, 2000:] = 40000
    pixels = prepare(encode(Image.fromarray(levels), "PNG"))
    assert pixels[100, 10].tolist() == [0, 0, 0] and pixels[100, 200].tolist() == [156, 156, 156]


def test_configure_pillow_keeps_a_bounded_cache_of_freed_image_memory_unless_pillows_variables_say_otherwise(
    monkeypatch,
):
    """BLOCKS_KEPT blocks of BLOCK_BYTES are kept for the next image (0.5 ms less web CPU per request,
    BENCHMARKS.md); an operator's PILLOW_BLOCK_SIZE or PILLOW_BLOCKS_MAX, read by Pillow itself, is left alone."""
    core = Image.core
    before = core.get_block_size(), core.get_blocks_max()
    uploads = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "PNG"), encode(photo("astronaut"), "WEBP")]
    try:
        core.set_block_size(16 * 1024 * 1024)
        core.set_blocks_max(0)
        monkeypatch.setenv("PILLOW_BLOCKS_MAX", "0")
        helpers.configure_pillow(MAX_PIXELS)
        assert (core.get_block_size(), core.get_blocks_max()) == (16 * 1024 * 1024, 0)
        uncached = [prepare(data) for data in uploads]
        monkeypatch.delenv("PILLOW_BLOCKS_MAX")
        helpers.configure_pillow(MAX_PIXELS)
        assert (core.get_block_size(), core.get_blocks_max()) == (helpers.BLOCK_BYTES, helpers.BLOCKS_KEPT)
        assert helpers.BLOCK_BYTES * helpers.BLOCKS_KEPT <= 16 * 1024 * 1024  # what a process may keep
        for _ in range(3):  # from reused blocks, each image comes out exactly as from fresh memory
            assert all(np.array_equal(prepare(data), pixels) for data, pixels in zip(uploads, uncached, strict=True))
    finally:
        core.set_block_size(before[0])
        core.set_blocks_max(before[1])
