"""Image preparation and the queue message format: pure functions, real images, no services."""

import base64
import io
import json

import numpy as np
import pytest
from conftest import encode, photo
from PIL import Image

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


# --- Messages ---------------------------------------------------------------------------------


def test_message_round_trip_keeps_every_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raw = helpers.encode_message("abc123", 1_800_000_000.25, 5, pixels)
    message = helpers.decode_message(raw)
    assert message.request_id == "abc123" and message.deadline == 1_800_000_000.25 and message.top == 5
    assert message.pixels.dtype == np.uint8 and np.array_equal(message.pixels, pixels)


def test_message_is_a_json_header_with_the_id_first_then_the_raw_pixels():
    pixels = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raw = helpers.encode_message("f" * 32, 1.0, 5, pixels)
    assert raw.startswith(b'{"id":"' + b"f" * 32)
    header, pixel_bytes = raw.split(b"\n", 1)
    assert json.loads(header) == {"id": "f" * 32, "deadline": 1.0, "top": 5, "shape": [224, 224, 3], "dtype": "uint8"}
    assert pixel_bytes == pixels.tobytes()  # any language reads it: row-major height x width x RGB
    assert len(raw) <= 150_700  # 150,528 pixel bytes and the header; base64 in JSON was 200,828
    assert helpers.decode_message(raw).pixels.base is not None  # a view of the message, not a copy


def test_workers_still_read_the_earlier_all_json_base64_message():
    """So that model workers can be upgraded before the web boxes that still send the earlier format."""
    pixels = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    earlier = {"id": "old1", "deadline": 9.5, "top": 3, "shape": [5, 7, 3], "dtype": "uint8"}
    earlier["data"] = base64.b64encode(pixels.tobytes()).decode()
    message = helpers.decode_message(json.dumps(earlier).encode())
    assert (message.request_id, message.deadline, message.top) == ("old1", 9.5, 3)
    assert np.array_equal(message.pixels, pixels)


def test_message_refuses_non_uint8_pixels():
    with pytest.raises(ValueError, match="uint8"):
        helpers.encode_message("x", 1.0, 5, np.zeros((4, 4, 3), np.float32))


def good_body(pixel_bytes: bytes = bytes(12), **changes) -> bytes:
    header = json.loads(helpers.encode_message("req1", 2.0, 5, np.zeros((2, 2, 3), np.uint8)).split(b"\n")[0])
    header.update(changes)
    return json.dumps({k: v for k, v in header.items() if v is not None}).encode() + b"\n" + pixel_bytes


@pytest.mark.parametrize(
    ("raw", "request_id", "reason"),
    [
        (b"\xff\xfenot json", None, "not JSON"),
        (b"not json\n" + bytes(12), None, "not JSON"),
        (b"[" * 100_000, None, "not JSON"),  # json.loads raises RecursionError: it must not kill the worker
        (good_body().split(b"\n")[0][:-1] + b',"data":"@@"}', "req1", "bad base64"),
        (b"[1, 2, 3]", None, "not a JSON object"),
        (good_body(id=None), None, "no request id"),
        (good_body(dtype="float32"), "req1", "dtype"),
        (good_body(shape=[2, 2]), "req1", "shape"),
        (good_body(shape=[3, 3, 3]), "req1", "do not fill"),
        (good_body(bytes(11)), "req1", "11 pixel bytes do not fill"),
        (good_body(bytes(13)), "req1", "13 pixel bytes do not fill"),
        (good_body().split(b"\n")[0], "req1", "0 pixel bytes do not fill"),  # no newline: no pixels
        (good_body(deadline=None), "req1", "bad or missing"),
        (good_body(top=0), "req1", "top"),
    ],
)
def test_bad_messages_say_what_is_wrong_and_keep_the_id_when_readable(raw, request_id, reason):
    with pytest.raises(helpers.MessageError, match=reason) as caught:
        helpers.decode_message(raw)
    assert caught.value.request_id == request_id


def test_answers_round_trip():
    predictions = [{"label": "tabby", "probability": 0.5}]
    assert helpers.decode_answer(helpers.encode_answer(predictions, 3, 41.234)) == {
        "predictions": predictions,
        "batch_size": 3,
        "inference_ms": 41.23,
    }
    assert helpers.decode_answer(helpers.encode_error(500, "boom")) == {"error": "boom", "status": 500}


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
