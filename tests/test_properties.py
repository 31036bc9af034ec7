"""Property-based tests (hypothesis) of the pure functions every request goes through.

The message format and image preparation are where hostile or unusual data meets the service. Examples
cannot cover every shape, mode, size and byte, so these state what must hold for all of them:
encoding then decoding gives back exactly what went in; decoding bytes that are not a valid message
raises MessageError and nothing else (anything else would crash the model worker that claimed it);
any upload either opens or is refused with a domain error (a 4xx, never a 500); and any image the
service accepts is prepared to uint8 pixels of exactly the model's size.
"""

import io
import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import helpers
import image_queue

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" on mutated images

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("id", "deadline", "top", "shape", "dtype")  # the message header's

# Any JSON value, including the numbers Python's json module reads that a float or int cannot hold.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)

# Pixels the protocol carries: uint8 (height, width, 3), sometimes a non-contiguous view.
pixel_arrays = st.builds(
    lambda a, flip: a[::-1, ::-1] if flip else a,
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))),
    st.booleans(),
)


def valid_message() -> tuple[dict, bytes]:
    """A valid message's header, parsed, and its pixel bytes."""
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    header, pixel_bytes = image_queue.encode_message("a" * 32, 1.7e9, 5, pixels).split(b"\n", 1)
    return json.loads(header), pixel_bytes


def decodes_or_refuses(raw: bytes) -> None:
    """decode_message gives a well-formed Message or raises MessageError; anything else fails the test."""
    try:
        message = image_queue.decode_message(raw)
    except image_queue.MessageError:
        return
    assert message.pixels.dtype == np.uint8 and message.pixels.ndim == 3 and message.pixels.shape[2] == 3
    assert isinstance(message.request_id, str) and message.request_id and message.top >= 1


# --- Queue messages ---------------------------------------------------------------------------


@FAST
@given(
    request_id=st.text(min_size=1),
    deadline=st.floats(allow_nan=False, allow_infinity=False),
    top=st.integers(min_value=1, max_value=10**30),
    pixels=pixel_arrays,
)
def test_a_message_decodes_to_exactly_what_was_encoded(request_id, deadline, top, pixels):
    message = image_queue.decode_message(image_queue.encode_message(request_id, deadline, top, pixels))
    assert (message.request_id, message.deadline, message.top) == (request_id, deadline, top)
    assert message.pixels.dtype == np.uint8 and np.array_equal(message.pixels, pixels)


@FAST
@given(arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6).filter(lambda c: c != 3))))
def test_pixels_without_three_channels_are_refused_when_decoded(pixels):
    with pytest.raises(image_queue.MessageError, match="shape"):
        image_queue.decode_message(image_queue.encode_message("id", 0.0, 1, pixels))


@FAST
@given(st.binary(max_size=600))
def test_decoding_any_bytes_raises_only_message_error(raw):
    decodes_or_refuses(raw)


@FAST
@given(json_values)
def test_decoding_any_json_raises_only_message_error(value):
    decodes_or_refuses(json.dumps(value).encode())
    decodes_or_refuses(json.dumps(value).encode() + b"\n" + bytes(18))


@FAST
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
@example(field="top", value=float("inf"), drop=False)  # int(inf): OverflowError, which crashed the worker
@example(field="deadline", value=10**400, drop=False)  # float(10**400): OverflowError
@example(field="shape", value=[float("inf"), 1, 3], drop=False)
def test_a_message_with_any_field_replaced_or_missing_raises_only_message_error(field, value, drop):
    header, pixel_bytes = valid_message()
    if drop:
        del header[field]
    else:
        header[field] = value
    decodes_or_refuses(json.dumps(header).encode() + b"\n" + pixel_bytes)


@FAST
@given(st.data())
def test_a_valid_message_with_bytes_changed_raises_only_message_error(data):
    raw = image_queue.encode_message("b" * 32, 1.7e9, 5, data.draw(pixel_arrays))
    decodes_or_refuses(mutated(data, raw, edits=8, actions=("set", "delete", "insert", "cut")))


def mutated(data, raw: bytes, edits: int, actions: tuple, longest_delete: int = 1, header: bool = False) -> bytes:
    """raw after 1 to `edits` random edits: a byte set, a run deleted, bytes inserted, or the tail cut;
    with header=True the edits often fall in the first 64 bytes."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, edits))):
        positions = st.integers(0, len(raw) - 1)
        if header:
            positions |= st.integers(0, min(len(raw), 64) - 1)
        at, action = data.draw(positions), data.draw(st.sampled_from(actions))
        if action == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[at : at + data.draw(st.integers(1, longest_delete))]
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at:]
        if not raw:
            break
    return bytes(raw)


@FAST
@given(
    predictions=st.lists(st.fixed_dictionaries({"label": st.text(), "probability": st.floats(0, 1)}), max_size=20),
    batch_size=st.integers(1, 4096),
    inference_ms=st.floats(0, 1e7),
)
def test_an_answer_decodes_to_what_was_encoded(predictions, batch_size, inference_ms):
    answer = image_queue.decode_answer(image_queue.encode_answer(predictions, batch_size, inference_ms))
    assert answer == {"predictions": predictions, "batch_size": batch_size, "inference_ms": round(inference_ms, 2)}


@FAST
@given(status=st.integers(400, 599), error=st.text())
def test_an_error_answer_decodes_to_what_was_encoded(status, error):
    assert image_queue.decode_answer(image_queue.encode_error(status, error)) == {"error": error, "status": status}


# --- Uploads ----------------------------------------------------------------------------------

MAX_PIXELS = 4_000_000  # small enough that a mutated header cannot make one example slow


def seed_images() -> dict[str, bytes]:
    """Small real images in every accepted format and its common variants, to mutate."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {
        "jpeg": (rgb, "JPEG", {}),
        "jpeg-progressive": (rgb, "JPEG", {"progressive": True}),
        "jpeg-cmyk": (rgb.convert("CMYK"), "JPEG", {}),
        "jpeg-exif": (rgb, "JPEG", {"exif": exif}),
        "mpo": (rgb, "MPO", {"save_all": True, "append_images": [rgb]}),
        "png": (rgb, "PNG", {}),
        "png-palette": (rgb.convert("P"), "PNG", {"transparency": 0}),
        "png-16": (gray16, "PNG", {}),
        "gif": (rgb.convert("P"), "GIF", {"save_all": True, "append_images": [rgb.convert("P")]}),
        "bmp": (rgb, "BMP", {}),
        "webp": (rgb, "WEBP", {}),
        "tiff": (rgb, "TIFF", {}),
        "tiff-lzw": (rgb, "TIFF", {"compression": "tiff_lzw"}),
        "tiff-16": (gray16, "TIFF", {}),
    }
    out = {}
    for name, (image, fmt, options) in images.items():
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        out[name] = buf.getvalue()
    return out


SEEDS = seed_images()


def opens_or_refuses(data: bytes, size: tuple[int, int] = (24, 16)) -> None:
    """open_image then prepare_image, with Pillow set as the service sets it: pixels of exactly `size`, or a
    domain error (400/413/415). Pillow's global limit is put back afterwards, for the tests that follow."""
    saved_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            helpers.configure_pillow(MAX_PIXELS)
            pixels = helpers.prepare_image(helpers.open_image(data, MAX_PIXELS), size)
    except helpers.ImageError as exc:
        assert isinstance(exc, helpers.NotAnImage | helpers.UnsupportedImage | helpers.ImageTooLarge)
        return
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    assert pixels.dtype == np.uint8 and pixels.shape == (size[1], size[0], 3)


@FAST
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff")
def test_any_bytes_open_as_an_image_or_raise_a_domain_error(data):
    opens_or_refuses(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_real_image_with_bytes_changed_is_prepared_or_refused_with_a_domain_error(data):
    raw = SEEDS[data.draw(st.sampled_from(sorted(SEEDS)))]
    actions = ("set", "set", "set", "delete", "insert", "cut")
    opens_or_refuses(mutated(data, raw, edits=6, actions=actions, longest_delete=64, header=True))


# Every mode a Pillow decoder of an accepted format can hand over (La: TIFF gray with premultiplied
# alpha; LAB: TIFF CIELab; I;16B: big-endian 16-bit TIFF), and the in-memory ones beside them.
MODES = (
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
    "I", "I;16", "I;16L", "I;16B", "I;16N", "F",
)  # fmt: skip


@st.composite
def any_images(draw) -> Image.Image:
    """An image of any mode and size up to 300 x 300, random pixels, maybe a transparent colour or an EXIF turn."""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    needed = len(Image.new(mode, (size[0], 1)).tobytes()) * size[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "F":  # finite values around the 0-255 range a float TIFF is usually in
        samples = rng.uniform(-50, 300, size[0] * size[1]).astype(np.float32)
        image = Image.frombytes(mode, size, samples.tobytes())
    else:
        image = Image.frombytes(mode, size, rng.bytes(needed))
    if mode in ("P", "L", "RGB") and draw(st.booleans()):
        image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
    orientation = draw(st.integers(1, 8))
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
    return image


@FAST
@given(image=any_images(), width=st.integers(1, 300), height=st.integers(1, 300))
@example(image=Image.new("La", (8, 8)), width=4, height=4)  # was refused as corrupt: Pillow cannot convert La
def test_any_image_the_service_accepts_is_prepared_to_exactly_the_target_size(image, width, height):
    pixels = helpers.prepare_image(image, (width, height))
    assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)


@FAST
@given(
    size=st.tuples(st.integers(1, 400), st.integers(1, 400)),
    target=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    mode=st.sampled_from(("RGB", "L", "CMYK")),
    quality=st.integers(5, 95),
)
def test_a_jpeg_of_any_size_is_prepared_to_exactly_the_target_size(size, target, mode, quality):
    """JPEGs take another path: decoded at a reduced scale (draft) when that still covers the target."""
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode != "CMYK" else (0, 0, 0, 0)).save(buf, "JPEG", quality=quality)
    pixels = helpers.prepare_image(helpers.open_image(buf.getvalue(), MAX_PIXELS), target)
    assert pixels.dtype == np.uint8 and pixels.shape == (target[1], target[0], 3)
    assert pixels.min() >= 240  # white stays white through the reduced decode, resize and colour conversion
