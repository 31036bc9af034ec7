"""Real photos (scikit-image's) and their encodings."""

import io

import numpy as np
from PIL import Image


def photo(name: str = "chelsea") -> Image.Image:
    """A real photo that ships with scikit-image (chelsea: a cat; coffee; astronaut; rocket)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def distinct_photos(n: int) -> list[bytes]:
    """n different real images as JPEG bytes: crops of four photos at different places and sizes."""
    sources = [photo(name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(7)
    images = []
    for i in range(n):
        source = sources[i % len(sources)]
        w, h = source.size
        side = int(rng.integers(min(w, h) // 3, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        images.append(encode(source.crop((x, y, x + side, y + side)), "JPEG", quality=90))
    return images
