"""The model seam: load, input size, preprocess, predict, label. Imported by the model worker only.

A keras.applications model (ResNet50 by default) or your own saved Keras model plug in the same way:
the worker sees a Classifier, hands it uint8 pixels and gets the top-k labels back.
"""

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k most probable classes of one row, most probable first: label, probability and class index."""
    k = min(k, len(probabilities))
    best = np.argsort(-probabilities, kind="stable")[:k]  # ties in class order (argpartition picked any of them)
    return [{"label": labels[i], "probability": float(probabilities[i]), "index": int(i)} for i in best]


# keras.applications models we know the preprocessing module of: name -> module.
APPLICATIONS = {
    "ResNet50": "resnet50",
    "ResNet101": "resnet",
    "ResNet152": "resnet",
    "ResNet50V2": "resnet_v2",
    "ResNet101V2": "resnet_v2",
    "ResNet152V2": "resnet_v2",
    "MobileNet": "mobilenet",
    "MobileNetV2": "mobilenet_v2",
    "MobileNetV3Small": "mobilenet_v3",
    "MobileNetV3Large": "mobilenet_v3",
    **{f"EfficientNetB{i}": "efficientnet" for i in range(8)},
    **{f"EfficientNetV2{s}": "efficientnet_v2" for s in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    "VGG16": "vgg16",
    "VGG19": "vgg19",
    "InceptionV3": "inception_v3",
    "InceptionResNetV2": "inception_resnet_v2",
    "Xception": "xception",
    "DenseNet121": "densenet",
    "DenseNet169": "densenet",
    "DenseNet201": "densenet",
    "ConvNeXtTiny": "convnext",
    "ConvNeXtSmall": "convnext",
    "ConvNeXtBase": "convnext",
    "NASNetMobile": "nasnet",
}
PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
# MODEL_PRECISION: auto, or a Keras dtype policy. On OpenVINO each maps to an inference precision hint; auto is
# bf16 where the CPU has it (OpenVINO's own default there), else f32; on Keras auto is float32.
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
OPENVINO_HINTS = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}
RUNTIMES = ("auto", "keras", "openvino")  # MODEL_RUNTIME
BUCKET_MODES = ("auto", "on", "off")  # BATCH_BUCKETS

# The ImageNet class index keras.applications.imagenet_utils.decode_predictions downloads.
IMAGENET_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
IMAGENET_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


class ModelConfigError(ValueError):
    """The model settings do not describe a model this worker can load."""


@dataclass
class Classifier:
    name: str
    model: object  # keras.Model, or an OpenVINOModel (which takes uint8 and preprocesses in its graph)
    preprocess: Callable[[np.ndarray], np.ndarray]  # on the host, float32 in and out; unused when takes_uint8
    labels: list[str]
    buckets: tuple[int, ...] = ()  # pad each batch up to the next of these sizes; (): run it as it comes
    takes_uint8: bool = False  # the model gets the uint8 pixels as they are: no float pass on the host
    runtime: str = "keras"  # what runs it, with its precision: for the start-up log
    precision: str = "float32"
    calls_take_turns: bool = False  # one predict at a time in this process (Keras on JAX: predict_takes_turns)
    _turn: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        _, height, width, _ = self.model.input_shape
        return int(height), int(width)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) -> float32 class probabilities (n, classes), in one forward pass."""
        n = len(pixels)
        size = next((b for b in self.buckets if b >= n), n)
        if size > n:  # zero images fill the bucket; their rows are dropped below
            pixels = np.concatenate([pixels, np.zeros((size - n, *pixels.shape[1:]), pixels.dtype)])
        x = pixels if self.takes_uint8 else self.preprocess(pixels.astype(np.float32))
        with self._turn if self.calls_take_turns else contextlib.nullcontext():
            probabilities = self.model.predict_on_batch(x)
        return np.asarray(probabilities, dtype=np.float32)[:n]

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict]:
        return top_k(probabilities, self.labels, k)

    def warm_up(self, batch_size: int, every_size: bool = False, rounds: int = 2) -> dict[int, float]:
        """Run every batch shape that traces or compiles a new function, so no request pays for it; time each.

        Uncompiled, predict_on_batch traces for batch 1 and 2 and then reuses one function for any size;
        compiled (XLA), each shape compiles, so every bucket runs. The full batch also sizes the memory
        pools. every_size: 1, 2, 4, ..., batch_size (for BATCH_TUNE). Returns seconds per batch size: the
        fastest of `rounds` runs after the first, the sizes taken in turn so that the machine's drift hits
        each alike.
        """
        sizes = self.buckets or (
            bucket_sizes(batch_size) if every_size else tuple(sorted({1, min(2, batch_size), batch_size}))
        )
        for n in sizes:
            self.predict(self._zeros(n))
        timings = {n: math.inf for n in sizes}
        for _ in range(rounds):
            for n in sizes:
                timings[n] = min(timings[n], self.time_batch(n, warm=True))
        return timings

    def time_batch(self, n: int, warm: bool = False) -> float:
        """Seconds one batch of n images takes; unless warm, timed on its second run (the first may compile)."""
        zeros = self._zeros(n)
        if not warm:
            self.predict(zeros)
        start = time.perf_counter()
        self.predict(zeros)
        return time.perf_counter() - start

    def _zeros(self, n: int) -> np.ndarray:
        height, width = self.input_size
        return np.zeros((n, height, width, 3), np.uint8)


def bucket_sizes(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... below batch_size, then batch_size: the batch shapes a compiled model is compiled for."""
    sizes = [1]
    while sizes[-1] * 2 < batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted({*sizes, batch_size}))


def choose_buckets(model, batch_size: int, mode: str = "auto") -> tuple[int, ...]:
    """Buckets to pad batches to (BATCH_BUCKETS): "auto" pads when the model runs compiled by XLA.

    Keras compiles predict_on_batch with XLA on the JAX backend, and on TensorFlow when a GPU is
    present; XLA compiles each new batch shape (1-2 s each on a CPU), so without buckets live requests
    would pay for 32 compilations. Uncompiled (TensorFlow on a CPU, torch) a batch runs at its own size:
    padding would only add work (a batch of 17 padded to 32 costs ~60% more on this CPU).
    """
    if mode not in BUCKET_MODES:
        raise ModelConfigError(f"BATCH_BUCKETS must be one of {', '.join(BUCKET_MODES)}, got {mode!r}")
    compiled = bool(getattr(model, "jit_compile", False))
    return bucket_sizes(batch_size) if mode == "on" or (mode == "auto" and compiled) else ()


def load_classifier(
    name: str = "ResNet50",
    weights: str = "imagenet",
    model_path: str = "",
    labels_path: str = "",
    preprocess: str = "",
    precision: str = "auto",
    runtime: str = "keras",
    cache_dir: str = "",
) -> Classifier:
    """Build the classifier the settings describe (see settings.py: MODEL_*, LABELS_PATH).

    precision: on Keras, a dtype policy for the layers built here (auto: float32); mixed_bfloat16 computes
    in bfloat16 and keeps the weights in float32, mixed_float16 is for GPUs with tensor cores. runtime
    "openvino" converts the Keras model to OpenVINO (openvino_classifier), cached in cache_dir; a model
    converted before is served from there without importing Keras.
    """
    if runtime not in RUNTIMES[1:]:
        raise ModelConfigError(f"MODEL_RUNTIME must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if preprocess and preprocess not in PREPROCESS_MODES:
        raise ModelConfigError(f"MODEL_PREPROCESS must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    if precision not in PRECISIONS:
        raise ModelConfigError(f"MODEL_PRECISION must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if model_path and not labels_path:
        raise ModelConfigError("MODEL_PATH needs LABELS_PATH: a JSON list of the model's class names")
    if not model_path and name not in APPLICATIONS:
        raise ModelConfigError(f"MODEL_NAME {name!r} is not one of: {', '.join(APPLICATIONS)}")
    weights_file = "" if weights in ("imagenet", "none", "") else weights
    for setting, path in (("MODEL_PATH", model_path), ("MODEL_WEIGHTS", weights_file), ("LABELS_PATH", labels_path)):
        if path and not os.path.isfile(path):
            raise ModelConfigError(
                f"{setting}={path}: no such file" + (OFFLINE_HINT if setting != "MODEL_PATH" else "")
            )
    if model_path:
        name = os.path.splitext(os.path.basename(model_path))[0]
    cache_dir = cache_dir or default_cache_dir()
    source = cache_source(name, weights, model_path, preprocess) if runtime == "openvino" else ""
    if source and os.path.exists(openvino_cache_path(cache_dir, name, source)):  # converted before: no Keras
        labels = load_labels(labels_path) if labels_path else cached_imagenet_labels()
        if labels and (cached := openvino_classifier(name, labels, precision, cache_dir, source)):
            return cached
    enable_gpu_memory_growth()
    import keras

    # for the layers built or loaded below; OpenVINO converts a float32 model and applies its own precision
    keras.mixed_precision.set_global_policy("float32" if precision == "auto" or runtime == "openvino" else precision)
    if model_path:
        try:
            model = keras.saving.load_model(model_path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ... for a bad file
            raise ModelConfigError(
                f"MODEL_PATH={model_path} is not a Keras model Keras can load ({first_line(exc)}): "
                "point it at a .keras (or Keras .h5) file saved with model.save()"
            ) from None
        classifier = Classifier(name, model, preprocess_function(preprocess or "none"), load_labels(labels_path))
    else:
        model = build_application(name, weights)
        module = getattr(keras.applications, APPLICATIONS[name])
        prep = preprocess_function(preprocess) if preprocess else module.preprocess_input
        labels = load_labels(labels_path) if labels_path else imagenet_labels()
        classifier = Classifier(name, model, prep, labels)
    check_shapes(classifier.model, "MODEL_PATH" if model_path else "MODEL_NAME")
    check_labels(int(classifier.model.output_shape[-1]), classifier.labels)
    if runtime == "openvino":
        if source and cache_source(name, weights, model_path, preprocess) != source:
            log.warning("the model's file changed while it loaded: converted this once, not kept in the cache")
            source = ""  # which file was read is not known: neither key may name it (the next start converts)
        return openvino_classifier(name, classifier.labels, precision, cache_dir, source, classifier)
    classifier.precision = "float32" if precision == "auto" else precision
    classifier.calls_take_turns = predict_takes_turns(keras.backend.backend())
    return classifier


def check_shapes(model, setting: str) -> None:
    """The model takes RGB images of one fixed size, (batch, height, width, 3), and gives one row of class
    scores per image: what the web prepares and the worker reads (else a traceback at warm-up, or a size
    read wrong)."""
    given, gives = model.input_shape, model.output_shape
    fixed = isinstance(given, tuple) and len(given) == 4 and all(isinstance(d, int) for d in given[1:3])
    if not (fixed and given[3] == 3):
        raise ModelConfigError(
            f"{setting}: the model must take RGB images of one fixed size, (batch, height, width, 3); this one "
            f"takes {given}"
        )
    if not (isinstance(gives, tuple) and len(gives) == 2 and isinstance(gives[1], int)):
        raise ModelConfigError(f"{setting}: the model must give (batch, classes) scores; this one gives {gives}")


def check_labels(classes: int, labels: list[str]) -> None:
    if classes != len(labels):
        raise ModelConfigError(f"the model has {classes} outputs but the labels file has {len(labels)} labels")


def predict_takes_turns(keras_backend: str) -> bool:
    """Whether a Keras model's predict_on_batch must not run on two threads at once in one process. On JAX,
    Keras donates the model's state buffers to each call, and a second call meanwhile fails ("Buffer has been
    deleted or donated"). The worker predicts on one thread anyway; the benchmark's in-process baseline
    predicts on each request's thread. TensorFlow and OpenVINO (an infer request per thread) run calls at once."""
    return keras_backend == "jax"


def load_configured_classifier(settings) -> Classifier:
    """The classifier the settings module describes (MODEL_*, LABELS_PATH): the worker's and the baseline's."""
    runtime, why = choose_runtime(settings.MODEL_RUNTIME)
    log.info("model runtime: %s (%s)", runtime, why)
    return load_classifier(
        settings.MODEL_NAME,
        settings.MODEL_WEIGHTS,
        settings.MODEL_PATH,
        settings.LABELS_PATH,
        settings.MODEL_PREPROCESS,
        settings.MODEL_PRECISION,
        runtime,
        settings.MODEL_CACHE_DIR,
    )


def cache_source(name: str, weights: str, model_path: str, preprocess: str) -> str:
    """What names a converted model in the cache: the same files (path, inode, size, times) give the same
    model. The part before the last "#" names the model (name, weights, preprocessing, paths); after it come
    the files' inodes, sizes, and modification and change times, which change when a file is replaced: the
    change time (ctime) too, which no copy can set (cp -p, tar and image layers keep the modification time,
    and weights of one architecture have one size: a replaced file was served as the old model). "" for
    random weights (MODEL_WEIGHTS=none), which differ at every load and are never cached."""
    if not model_path and weights in ("none", ""):
        return ""
    files = [os.path.abspath(f) for f in ([model_path] if model_path else [] if weights == "imagenet" else [weights])]
    stats = ",".join(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}" for st in map(os.stat, files))
    return "|".join([name, weights, preprocess, *files]) + "#" + stats


def choose_runtime(requested: str) -> tuple[str, str]:
    """MODEL_RUNTIME: (keras or openvino, why). auto: OpenVINO on a machine without a GPU where it is installed
    (3-4x TensorFlow's images/s on this project's CPU at bf16), Keras otherwise (GPUs, or no OpenVINO)."""
    if requested not in RUNTIMES:
        raise ModelConfigError(f"MODEL_RUNTIME must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested != "auto":
        return requested, "MODEL_RUNTIME"
    if gpu := gpu_device():
        return "keras", f"auto: a GPU ({gpu})"
    if importlib.util.find_spec("openvino") is None:
        return "keras", "auto: no GPU, and OpenVINO is not installed"
    return "openvino", "auto: no GPU, OpenVINO installed"


def runs_on_host_cpu(runtime: str) -> bool:
    """Whether a model on this runtime runs its forward pass on the host's own cores: OpenVINO always (it is
    compiled for "CPU"), Keras where there is no GPU."""
    return runtime == "openvino" or not gpu_device()


def gpu_device() -> str:
    """The first NVIDIA or AMD GPU device file, or "" (cheap, and the same whatever the Keras backend); ""
    also where CUDA_VISIBLE_DEVICES hides every GPU ("" or "-1", the usual way to force the CPU: as
    stack.visible_gpus reads it), which chose Keras on the CPU and a GPU's pipeline depth."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and (not hidden.strip() or hidden.split(",")[0].strip().startswith("-")):
        return ""
    return next(iter(sorted(glob.glob("/dev/nvidia[0-9]*")) + glob.glob("/dev/kfd")), "")


def default_cache_dir() -> str:
    """MODEL_CACHE_DIR's default: $XDG_CACHE_HOME/keras-rest-api, else ~/.cache/keras-rest-api."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keras-rest-api")


class OpenVINOModel:
    """A compiled OpenVINO model with the surface Classifier uses of a Keras model: uint8 (n, h, w, 3) in,
    probabilities out, any n (a dynamic batch dimension: no buckets, nothing compiled per size). Each thread
    gets its own infer request, so threads may predict at once (the benchmark's in-process baseline does)."""

    jit_compile = False

    def __init__(self, compiled, input_shape: tuple, output_shape: tuple):
        self.compiled, self.input_shape, self.output_shape = compiled, input_shape, output_shape
        self._requests = threading.local()

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        if (request := getattr(self._requests, "request", None)) is None:
            request = self._requests.request = self.compiled.create_infer_request()
        return request.infer(np.ascontiguousarray(pixels))[0]  # a copy: the request's buffer is reused


def openvino_classifier(
    name: str, labels: list[str], precision: str, cache_dir: str, source: str, convert_from: Classifier | None = None
) -> Classifier | None:
    """The model compiled for the CPU on OpenVINO: read from cache_dir, or converted from convert_from (on Keras).

    The graph takes uint8 pixels and casts and scales them itself, so the host does no float pass. The
    converted model is kept in cache_dir under a name made from source (the model's files), and OpenVINO
    keeps its compiled form there too (CACHE_DIR), so a restart neither converts nor compiles again, and
    needs no Keras (load_classifier imports it only to convert); source "" (random weights) converts every
    time. None where the cache lacks the model and there is no Keras classifier to convert. OpenVINO's usage
    telemetry is never imported (import_openvino).
    """
    ov = import_openvino()
    core = ov.Core()
    hint = openvino_hint(precision, core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    path = openvino_cache_path(cache_dir, name, source)
    started = time.perf_counter()
    # One process at a time converts, tidies and compiles in cache_dir: two workers starting together on a cold
    # cache raced on the compiled blob, and one died ("cannot set permissions: No such file"); now the second
    # waits, then reads what the first wrote, and nothing is removed while another process reads it.
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(os.path.join(cache_dir, ".compile.lock"), "w")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ModelConfigError(
            f"MODEL_CACHE_DIR={cache_dir} cannot be used ({exc}): point it at a directory this worker may write"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if source and os.path.exists(path):
            try:
                return compiled_classifier(core, path, hint, name, labels, source, f"from {path}", started)
            except ModelConfigError:
                raise
            except Exception as exc:  # a damaged entry (a power cut mid-write, a file removed): convert again
                log.warning("the cached OpenVINO model %s cannot be read (%s); converting it again", path, exc)
                remove_entry(path)  # (without Keras loaded, None: the caller loads it and comes back to convert)
        if convert_from is None:
            return None
        folder = export_with_preprocessing(convert_from)
        try:
            graph = ov.convert_model(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        how = "converted from Keras"
        if source:  # written whole under another name, synced, then renamed: nothing ever reads half of it
            for orphan in glob.glob(os.path.join(glob.escape(cache_dir), ".[0-9]*-*.[xb][mi][ln]")):
                os.remove(orphan)  # a conversion killed half-way (we hold the lock: none is running)
            partial = os.path.join(cache_dir, f".{os.getpid()}-{os.path.basename(path)}")
            ov.save_model(graph, partial, compress_to_fp16=False)
            for written in (partial[:-4] + ".bin", partial):
                with open(written, "rb") as f:
                    os.fsync(f.fileno())  # on disk before the rename (a power cut left empty files named right)
            os.replace(partial[:-4] + ".bin", path[:-4] + ".bin")
            os.replace(partial, path)
            graph, how = path, how + f", saved to {path}"
            removed = remove_older_versions(path)
            how += f" (older versions of it removed: {', '.join(removed)})" if removed else ""
        return compiled_classifier(core, graph, hint, name, labels, source, how, started)


def compiled_classifier(core, graph, hint: str, name: str, labels, source: str, how: str, started: float) -> Classifier:
    """The graph (a model, or the cached file's path) compiled for the CPU, as a Classifier; its precision the one
    OpenVINO runs, which may differ from the hint (logged)."""
    ov = import_openvino()
    if source:  # compiled from the saved file, its compiled form kept beside it: the next start loads that
        core.set_property({"CACHE_DIR": compiled_cache_dir(graph)})  # graph is the saved file's path then
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    runs = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32, bf16, f16
    took = time.perf_counter() - started
    log.info("OpenVINO %s: %s model %s and compiled in %.1f s", ov.__version__.split("-")[0], runs, how, took)
    if runs != hint:
        log.warning("OpenVINO runs this model at %s, not the %s asked for (MODEL_PRECISION)", runs, hint)
    input_shape, output_shape = (shape(port.get_partial_shape()) for port in (compiled.input(0), compiled.output(0)))
    check_labels(output_shape[-1], labels)
    model = OpenVINOModel(compiled, input_shape, output_shape)
    return Classifier(name, model, lambda x: x, labels, (), True, "openvino", runs)


def remove_entry(path: str) -> None:
    """A converted model's files in the cache (.xml, .bin) and its compiled forms."""
    for stale in (path, path[:-4] + ".bin"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    shutil.rmtree(compiled_cache_dir(path), ignore_errors=True)


def import_openvino():
    """OpenVINO, its usage telemetry never imported (every import of OpenVINO here goes through this): an import
    of openvino_telemetry then fails, and the converter uses its built-in no-op, so nothing leaves the machine."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


def shape(partial) -> tuple:
    """An OpenVINO partial shape as Keras writes one: (None, 224, 224, 3), None where dynamic (the batch)."""
    return tuple(None if d.is_dynamic else d.get_length() for d in partial)


def openvino_cache_path(cache_dir: str, name: str, source: str) -> str:
    """Where openvino_classifier keeps the converted model (an IR .xml, its weights in the .bin beside it, OpenVINO's
    compiled forms in compiled_cache_dir): {name}-{model}-{version}.xml, model naming the model (source
    before its "#") as the Keras and OpenVINO versions convert it, version its files' sizes and times too.
    Two installs of different versions sharing a cache so never remove each other's copies. Exists only
    once a model with a non-empty source was loaded; the benchmark's peers (bench/peers) load it from there."""
    ov = import_openvino()

    runtimes = f"keras-{keras_version()}|openvino-{ov.__version__}"
    model = hashlib.sha256(f"{source.rpartition('#')[0]}|{runtimes}".encode()).hexdigest()[:8]
    version = hashlib.sha256(f"{source}|{runtimes}".encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{name}-{model}-{version}.xml")


def compiled_cache_dir(path: str) -> str:
    """The folder OpenVINO keeps the compiled forms of the converted model at path in (its CACHE_DIR)."""
    return path[: -len(".xml")] + ".compiled"


def remove_older_versions(path: str) -> list[str]:
    """Remove the cache's other versions of the model converted to path (the same name and file paths, with
    files since replaced: nothing will load them again); their names. A model updated in place so leaves one
    converted copy, not one per update. The caller holds the cache's lock."""
    model = path[: -len(".xml")].rsplit("-", 1)[0]  # .../{name}-{model}
    removed = []
    for old in glob.glob(glob.escape(model) + "-" + "[0-9a-f]" * 12 + ".xml"):
        if old == path:
            continue
        for leftover in (old, old[: -len(".xml")] + ".bin"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        shutil.rmtree(compiled_cache_dir(old), ignore_errors=True)
        removed.append(os.path.basename(old))
    return removed


def openvino_hint(precision: str, capabilities: list[str]) -> str:
    """MODEL_PRECISION -> OpenVINO's INFERENCE_PRECISION_HINT: auto is bf16 where the CPU has it, else f32."""
    if precision == "auto":
        return "bf16" if "BF16" in capabilities else "f32"
    return OPENVINO_HINTS[precision]


def export_with_preprocessing(classifier: Classifier) -> str:
    """A SavedModel of uint8 pixels -> cast -> the classifier's preprocessing -> the model (a temporary folder)."""
    import tempfile

    import keras

    height, width = classifier.input_size
    pixels = keras.Input((height, width, 3), dtype="uint8")
    scaled = keras.layers.Lambda(lambda x: classifier.preprocess(keras.ops.cast(x, "float32")))(pixels)
    folder = tempfile.mkdtemp(prefix="openvino-export-")
    keras.Model(pixels, classifier.model(scaled)).export(folder, format="tf_saved_model", verbose=False)
    return folder


def keras_version() -> str:
    """The installed Keras's version, read without importing it where it is installed as "keras" (a cached
    model is served without Keras); imported otherwise (keras-nightly, a source checkout)."""
    try:
        return importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        import keras

        return keras.__version__


def build_application(name: str, weights: str):
    """A keras.applications model with ImageNet, local or no weights; ModelConfigError says which setting fixes
    a download that fails (offline, or a partial file in Keras's cache) or a weights file that does not fit."""
    import keras

    constructor = getattr(keras.applications, name)
    if weights in ("", "none"):
        log.warning("MODEL_WEIGHTS=none: %s with random weights, so its answers mean nothing", name)
        return constructor(weights=None)
    try:
        if weights.endswith(".weights.h5"):  # Keras 3 format: build, then load
            model = constructor(weights=None)
            model.load_weights(weights)
            return model
        return constructor(weights=weights)  # "imagenet" (downloaded and cached) or a Keras 2 .h5 file
    except Exception as exc:  # a download (Keras raises a bare Exception), h5py's OSError, a shape ValueError
        if weights == "imagenet":
            raise ModelConfigError(
                f"could not download the ImageNet weights of {name} ({first_line(exc)}); a partial download in "
                f"{keras_cache()} is fetched again only online." + OFFLINE_HINT
            ) from None
        raise ModelConfigError(
            f"MODEL_WEIGHTS={weights} is not a weights file of {name} ({first_line(exc)})." + OFFLINE_HINT
        ) from None


# What a worker that cannot get its weights or labels says, after what failed.
OFFLINE_HINT = (
    " Set MODEL_WEIGHTS=/path/to/file.h5 (the weights file, copied to this machine) and"
    " LABELS_PATH=models/imagenet_class_index.json: see the README's Offline section"
)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for an error a person reads."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def keras_cache() -> str:
    """Where keras.utils.get_file keeps downloads (KERAS_HOME, else ~/.keras), its models/ folder."""
    return os.path.join(os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"), "models")


def preprocess_function(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """keras.applications' pixel scaling by mode; "none" leaves pixels as float 0..255."""
    if mode == "none":
        return lambda x: x
    from keras.applications import imagenet_utils

    return lambda x: imagenet_utils.preprocess_input(x, mode=mode)


def load_labels(path: str) -> list[str]:
    """A JSON list of names, {"0": "name", ...}, or the ImageNet index {"0": [wnid, name], ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise ModelConfigError(f"LABELS_PATH={path} is not a JSON labels file ({first_line(exc)})") from None
    if isinstance(data, list):
        return [str(label) for label in data]
    if isinstance(data, dict):
        try:
            ordered = [data[str(i)] for i in range(len(data))]
        except KeyError:
            raise ModelConfigError(f"{path}: keys must be the class numbers 0..{len(data) - 1}") from None
        return [str(v[-1]) if isinstance(v, list) else str(v) for v in ordered]
    raise ModelConfigError(f"{path}: expected a JSON list or object of labels")


def cached_imagenet_labels() -> list[str] | None:
    """The ImageNet index where Keras keeps it, read without importing Keras; None unless it is there whole."""
    path = os.path.join(keras_cache(), "imagenet_class_index.json")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if hashlib.md5(f.read(), usedforsecurity=False).hexdigest() == IMAGENET_INDEX_MD5:
            return load_labels(path)
    return None


def imagenet_labels() -> list[str]:
    """The ImageNet index from Keras's cache, downloading it once on a connected machine."""
    if labels := cached_imagenet_labels():
        return labels
    import keras

    try:
        path = keras.utils.get_file(
            "imagenet_class_index.json", IMAGENET_INDEX_URL, cache_subdir="models", file_hash=IMAGENET_INDEX_MD5
        )
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        raise ModelConfigError(
            f"could not download the ImageNet class index ({first_line(exc)}): set "
            "LABELS_PATH=models/imagenet_class_index.json (it ships with the service); see the README's Offline section"
        ) from None
    return load_labels(path)


def enable_gpu_memory_growth() -> None:
    """Take GPU memory as needed rather than most of it up front (CUDA_VISIBLE_DEVICES picks GPUs), so that
    several processes can share a GPU (the benchmark's baseline does): on JAX through XLA's allocator
    setting, which must be set before JAX is imported; on TensorFlow through memory growth."""
    if os.environ.get("KERAS_BACKEND") == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # GPUs already initialised
            log.warning("could not turn on memory growth for %s: %s", gpu.name, exc)
