"""Bring your own model: a CNN trained here on scikit-learn's handwritten digits, served over HTTP.

Unlike seeded random weights, this model's answers really depend on the input, so it shows that each
image's own pixels reach the model and come back as that image's answer.
"""

import json

import numpy as np
import pytest
from PIL import Image
from support.images import encode
from test_e2e import post_all

import helpers

pytestmark = pytest.mark.slow

INPUT = 16  # the model's input size: the service resizes the 8x8 digits to 16x16


def digit_png(values: np.ndarray) -> bytes:
    """An 8x8 digit (0..16 ink) as the grayscale PNG a user would upload."""
    return encode(Image.fromarray((values.reshape(8, 8) * 255 / 16).astype(np.uint8), "L"), "PNG")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """Train on 70% of the digits (prepared exactly as the web side prepares uploads); save model + labels."""
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    prepare = lambda values: helpers.prepare_image(helpers.open_image(digit_png(values), 10**6), (INPUT, INPUT))  # noqa: E731
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((INPUT, INPUT, 3)),
            keras.layers.Rescaling(1 / 255),  # the model scales its own input: MODEL_PREPROCESS=none
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(np.stack([prepare(v) for v in train_x]), train_y, epochs=12, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("digits")
    model.save(folder / "digits.keras")
    (folder / "labels.json").write_text(json.dumps([str(d) for d in range(10)]))
    return folder, test_x, test_y


def test_own_model_classifies_held_out_digits_over_http(make_stack, digits_model):
    folder, test_x, test_y = digits_model
    s = make_stack(
        MODEL_PATH=folder / "digits.keras",
        LABELS_PATH=folder / "labels.json",
        MODEL_PREPROCESS="none",
        MODEL_WEIGHTS="",
        REQUEST_TIMEOUT_S=60,
        GUNICORN_TIMEOUT_S=90,
    )
    s.start_worker()
    s.start_web()
    s.wait_ready()

    images = [digit_png(v) for v in test_x[:200]]
    responses = [r for start in range(0, 200, 50) for r in post_all(s.url, images[start : start + 50])]

    assert [r.status_code for r in responses] == [200] * 200
    predicted = [r.json()["predictions"][0]["label"] for r in responses]
    accuracy = np.mean([p == str(t) for p, t in zip(predicted, test_y[:200], strict=True)])
    print(f"held-out digits classified right over HTTP: {accuracy:.1%}")  # shown by pytest -rP
    assert accuracy >= 0.90, accuracy
    assert len(set(predicted)) == 10  # every digit is recognised, not one label for everything
