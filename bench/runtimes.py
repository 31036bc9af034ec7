"""The runtime table: ResNet50 (seeded random weights) on each runtime and precision the worker offers,
images/s at batch 1, 8 and 32, and how far each one's probabilities are from Keras float32's.

    python -m bench.runtimes [--rounds 3] [--seconds 4]   (~4 minutes on 2 cores; converts into a temporary cache)

Variants are timed in turn within each round (A B C D A B C D ...), so a machine's drift hits them all;
the figure is the median over rounds. Probabilities are compared on 16 crops of the photos in images/,
prepared as the web prepares them.
"""

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import helpers  # noqa: E402
from classifier import load_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [("keras", "float32"), ("keras", "mixed_bfloat16"), ("openvino", "float32"), ("openvino", "auto")]


def photos(n: int) -> np.ndarray:
    from PIL import Image

    sources = [Image.open(path).convert("RGB") for path in sorted((ROOT / "images").glob("*.jpg"))]
    rng, pixels = np.random.default_rng(7), []
    for i in range(n):
        source = sources[i % len(sources)]
        side = int(rng.integers(min(source.size) // 3, min(source.size)))
        x, y = int(rng.integers(0, source.width - side + 1)), int(rng.integers(0, source.height - side + 1))
        buffer = io.BytesIO()
        source.crop((x, y, x + side, y + side)).save(buffer, "JPEG", quality=90)
        pixels.append(helpers.prepare_image(helpers.open_image(buffer.getvalue(), 10**8), (224, 224)))
    return np.stack(pixels)


def images_per_s(model, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), np.uint8)
    model.predict(x)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(x)
        n += batch
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per variant, batch and round")
    args = parser.parse_args()
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/resnet50.weights.h5"
        keras.utils.set_random_seed(1234)
        keras.applications.ResNet50(weights=None).save_weights(weights)
        labels = str(ROOT / "models" / "imagenet_class_index.json")
        models = {
            (runtime, precision): load_classifier(
                "ResNet50", weights, labels_path=labels, precision=precision, runtime=runtime, cache_dir=f"{tmp}/cache"
            )
            for runtime, precision in VARIANTS
        }
        test = photos(16)
        reference = models[("keras", "float32")].predict(test)
        rates: dict = {(v, b): [] for v in models for b in (1, 8, 32)}
        for _ in range(args.rounds):
            for batch in (1, 8, 32):
                for variant, model in models.items():
                    rates[(variant, batch)].append(images_per_s(model, batch, args.seconds))
    print("| runtime | precision | images/s at batch 1 / 8 / 32 | max probability difference | top-1 agreement |")
    print("|---|---|---|---|---|")
    for (runtime, precision), model in models.items():
        got = model.predict(test)
        diff = float(np.abs(got - reference).max())
        top1 = float(np.mean(got.argmax(axis=1) == reference.argmax(axis=1)))
        speeds = " / ".join(f"{statistics.median(rates[((runtime, precision), b)]):.1f}" for b in (1, 8, 32))
        print(f"| {runtime} | {model.precision} | {speeds} | {diff:.1e} | {top1:.2f} |")


if __name__ == "__main__":
    main()
