"""The OpenVINO runtime (MODEL_RUNTIME=openvino, or auto on a machine without a GPU): the seeded ResNet50
converted from Keras with its preprocessing in the graph, compared with the same weights on Keras, cached
for restarts, and converted without any connection leaving the machine."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from support import IMAGENET_INDEX, ROOT
from support.images import distinct_photos

import classifier as seam
import helpers


def photo_pixels(n: int, size=(224, 224)) -> np.ndarray:
    return np.stack([helpers.prepare_image(helpers.open_image(d, 10**8), size) for d in distinct_photos(n)])


def test_auto_is_openvino_without_a_gpu_where_installed_and_keras_otherwise(monkeypatch):
    monkeypatch.setattr(seam, "gpu_device", lambda: "")
    assert seam.choose_runtime("auto") == ("openvino", "auto: no GPU, OpenVINO installed")
    assert seam.choose_runtime("keras") == ("keras", "MODEL_RUNTIME")
    monkeypatch.setattr(seam, "gpu_device", lambda: "/dev/nvidia0")
    assert seam.choose_runtime("auto") == ("keras", "auto: a GPU (/dev/nvidia0)")
    assert seam.choose_runtime("openvino")[0] == "openvino"  # asked for: taken as is
    monkeypatch.setattr(seam, "gpu_device", lambda: "")
    monkeypatch.setattr(seam.importlib.util, "find_spec", lambda name: None)
    assert seam.choose_runtime("auto") == ("keras", "auto: no GPU, and OpenVINO is not installed")
    with pytest.raises(seam.ModelConfigError, match="MODEL_RUNTIME must be one of auto, keras, openvino"):
        seam.choose_runtime("onnx")


def test_a_model_runs_on_the_hosts_cores_on_openvino_always_on_keras_without_a_gpu(monkeypatch):
    monkeypatch.setattr(seam, "gpu_device", lambda: "")
    assert seam.runs_on_host_cpu("openvino") and seam.runs_on_host_cpu("keras")
    monkeypatch.setattr(seam, "gpu_device", lambda: "/dev/nvidia0")
    assert seam.runs_on_host_cpu("openvino") and not seam.runs_on_host_cpu("keras")


def test_precision_maps_to_openvinos_hint_auto_being_bf16_where_the_cpu_has_it():
    assert seam.openvino_hint("auto", ["BF16", "FP32"]) == "bf16"
    assert seam.openvino_hint("auto", ["FP32", "INT8"]) == "f32"
    assert [seam.openvino_hint(p, ["BF16"]) for p in ("float32", "mixed_bfloat16", "mixed_float16")] == [
        "f32", "bf16", "f16"
    ]  # fmt: skip


def test_the_graph_takes_uint8_and_an_images_answer_does_not_depend_on_its_batch(resnet):
    if resnet.runtime != "openvino":
        pytest.skip("the shipped defaults chose Keras on this machine (a GPU, or no OpenVINO)")
    assert resnet.takes_uint8 and str(resnet.model.compiled.input(0).get_element_type()) == "<Type: 'uint8_t'>"
    pixels = photo_pixels(8)
    together = resnet.predict(pixels)
    alone = np.concatenate([resnet.predict(pixels[i : i + 1]) for i in range(8)])
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)  # so a served answer is the direct one


def test_openvino_against_keras_float32_on_the_test_photos(resnet, resnet_keras):
    """Reported, not loosened anywhere: bf16 moves probabilities a little and keeps the top label."""
    if resnet.runtime != "openvino":
        pytest.skip("the shipped defaults chose Keras on this machine")
    pixels = photo_pixels(8)
    fast, full = resnet.predict(pixels), resnet_keras.predict(pixels)
    top1 = float(np.mean(fast.argmax(axis=1) == full.argmax(axis=1)))
    diff = float(np.abs(fast - full).max())
    print(f"\nOpenVINO {resnet.precision} vs Keras float32, 8 photos: top-1 agreement {top1:.2f}, max |dp| {diff:.2e}")
    assert top1 == 1.0 and diff < 0.05  # bf16 keeps ~3 significant digits (Keras' own mixed_bfloat16: ~0.03)


def test_a_restart_reads_the_converted_model_from_the_cache_and_answers_the_same(
    resnet, resnet_weights, model_cache, caplog
):
    if resnet.runtime != "openvino":
        pytest.skip("the shipped defaults chose Keras on this machine")
    with caplog.at_level(logging.INFO, "classifier"):
        again = seam.load_classifier(
            "ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX), runtime="openvino",
            cache_dir=str(model_cache),
        )  # fmt: skip
    assert "model from " in caplog.text and "converted" not in caplog.text, caplog.text
    assert again.model.compiled.get_property("LOADED_FROM_CACHE")  # nor compiled again: OpenVINO's blob read
    pixels = photo_pixels(2)
    np.testing.assert_array_equal(again.predict(pixels), resnet.predict(pixels))


# A restart in a fresh interpreter: the model converted before is read from the cache and served, and the labels
# (no LABELS_PATH) from where Keras keeps the ImageNet index; it prints what it imported and its peak memory.
CACHED_RESTART = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import numpy as np
import classifier
model = classifier.load_classifier("ResNet50", sys.argv[1], runtime="openvino", cache_dir=sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3], allow_pickle=False)))
print(json.dumps({
    "imported": sorted(m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules),
    "from_cache": bool(model.model.compiled.get_property("LOADED_FROM_CACHE")), "labels": model.labels[281],
    "input_size": model.input_size,
    "peak_rss_mb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024,
}))
"""


def test_a_restart_from_the_cache_serves_without_importing_keras_or_tensorflow(
    resnet, resnet_weights, model_cache, tmp_path
):
    if resnet.runtime != "openvino":
        pytest.skip("the shipped defaults chose Keras on this machine")
    (tmp_path / "keras" / "models").mkdir(parents=True)  # where Keras keeps the ImageNet index it downloaded
    shutil.copy(IMAGENET_INDEX, tmp_path / "keras" / "models" / "imagenet_class_index.json")
    pixels = photo_pixels(3)
    np.save(tmp_path / "pixels.npy", pixels)
    result = subprocess.run(
        [sys.executable, "-c", CACHED_RESTART, str(resnet_weights), str(model_cache), str(tmp_path / "pixels.npy"),
         str(tmp_path / "answers.npy")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ | {"KERAS_HOME": str(tmp_path / "keras")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["imported"] == [] and seen["from_cache"], seen
    assert seen["labels"] == "tabby" and seen["input_size"] == [224, 224]
    np.testing.assert_array_equal(np.load(tmp_path / "answers.npy", allow_pickle=False), resnet.predict(pixels))
    print(f"a restart from the cache, in a fresh interpreter: peak RSS {seen['peak_rss_mb']:.0f} MB")


def test_the_imagenet_index_is_read_from_kerass_cache_only_when_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("keras.utils.get_file", lambda *a, **k: (_ for _ in ()).throw(Exception("offline")))
    assert seam.cached_imagenet_labels() is None  # not there
    (tmp_path / "models").mkdir()
    index = tmp_path / "models" / "imagenet_class_index.json"
    shutil.copy(IMAGENET_INDEX, index)
    assert seam.cached_imagenet_labels()[281] == seam.imagenet_labels()[281] == "tabby"  # read, not fetched
    index.write_text(index.read_text()[:-100])  # a partial download: only Keras's own get_file fetches it again
    assert seam.cached_imagenet_labels() is None
    with pytest.raises(seam.ModelConfigError, match="could not download the ImageNet class index"):
        seam.imagenet_labels()


def test_a_restart_from_the_cache_with_a_labels_file_that_does_not_fit_says_so(
    resnet, resnet_weights, model_cache, tmp_path, monkeypatch
):
    if resnet.runtime != "openvino":
        pytest.skip("the shipped defaults chose Keras on this machine")
    (tmp_path / "labels.json").write_text('["cat", "dog"]')
    monkeypatch.setattr(seam, "build_application", lambda *a: pytest.fail("built the Keras model: not from the cache"))
    with pytest.raises(seam.ModelConfigError, match="the model has 1000 outputs but the labels file has 2 labels"):
        seam.load_classifier(
            "ResNet50", str(resnet_weights), labels_path=str(tmp_path / "labels.json"), runtime="openvino",
            cache_dir=str(model_cache),
        )  # fmt: skip


def test_a_model_file_replaced_in_place_is_converted_again_and_only_its_older_version_is_removed(tmp_path, caplog):
    import keras

    cache, first, second = tmp_path / "cache", tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    keras.utils.set_random_seed(3)
    keras.applications.MobileNetV2(weights=None).save_weights(first)
    shutil.copy(first, second)

    def load(weights, cache=cache):
        caplog.clear()
        with caplog.at_level(logging.INFO, "classifier"):
            loaded = seam.load_classifier("MobileNetV2", str(weights), labels_path=str(IMAGENET_INDEX),
                                          runtime="openvino", cache_dir=str(cache))  # fmt: skip
        return caplog.text, loaded.model.compiled.get_property("LOADED_FROM_CACHE")

    def cached():
        return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))

    assert "converted from Keras" in load(first)[0] and "converted from Keras" in load(second)[0]
    a, b = [p.name[: -len(".xml")] for p in sorted(cache.glob("*.xml"), key=lambda p: p.stat().st_mtime_ns)]
    assert cached() == sorted(f"{m}{ext}" for m in (a, b) for ext in (".bin", ".compiled", ".xml"))
    assert len(list((cache / f"{a}.compiled").iterdir())) == 1  # OpenVINO's compiled form, beside its model
    text, from_cache = load(first)
    assert "model from " in text and from_cache  # a restart: neither converted nor compiled again
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # replaced in place
    for orphan in (".4242-MobileNetV2-x-y.xml", ".4242-MobileNetV2-x-y.bin"):  # a conversion killed half-way
        (cache / orphan).write_bytes(b"half")
    text, _ = load(first)
    assert "converted from Keras" in text and f"older versions of it removed: {a}.xml" in text, text
    assert a not in "".join(cached()) and f"{b}.xml" in cached() and len(cached()) == 6  # the other model stays
    assert not list(cache.glob(".4242-*"))  # the orphans went with the conversion
    _, from_cache = load(first)
    assert from_cache  # the new version's first compile was kept, so the first restart reads it
    load("none", tmp_path / "random")  # random weights: converted and compiled afresh, nothing kept
    assert [p.name for p in (tmp_path / "random").iterdir()] == [".compile.lock"]


def test_a_copy_keeping_size_and_time_a_damaged_entry_and_an_unwritable_cache_dir(tmp_path, caplog):
    """A file replaced by one of the same size keeping its modification time (cp -p, tar, image layers) is
    converted again (its change time differs), not served as the old model; a damaged entry (a power cut mid-
    write) is converted again, not a crash at every start; a cache directory that cannot be written is one
    line naming MODEL_CACHE_DIR."""
    import keras

    cache, path, other = tmp_path / "cache", tmp_path / "m.weights.h5", tmp_path / "other.weights.h5"
    for seed, file in ((3, path), (4, other)):
        keras.utils.set_random_seed(seed)
        keras.applications.MobileNetV2(weights=None).save_weights(file)
    assert path.stat().st_size == other.stat().st_size  # one architecture, one size

    def load(weights=path, cache_dir=cache):
        caplog.clear()
        with caplog.at_level(logging.INFO, "classifier"):
            loaded = seam.load_classifier("MobileNetV2", str(weights), labels_path=str(IMAGENET_INDEX),
                                          runtime="openvino", cache_dir=str(cache_dir))  # fmt: skip
        return caplog.text, loaded

    def weights_in(folder) -> bytes:  # the converted model's weights (random MobileNetV2s answer alike: uniform)
        (converted,) = folder.glob("*.bin")
        return converted.read_bytes()

    load()
    first = weights_in(cache)
    modified = path.stat().st_mtime_ns
    shutil.copyfile(other, path)
    os.utime(path, ns=(modified, modified))  # the same size and modification time: only the content differs
    text, _ = load()
    assert "converted from Keras" in text, text
    load(other, tmp_path / "direct")
    assert weights_in(cache) == weights_in(tmp_path / "direct") != first  # the new file's model, not the old
    (xml,) = cache.glob("*.xml")
    xml.write_bytes(b"")  # renamed into place before it reached the disk
    shutil.rmtree(cache / f"{xml.stem}.compiled")
    text, repaired = load()
    assert "cannot be read" in text and "converted from Keras" in text, text
    assert weights_in(cache) == weights_in(tmp_path / "direct") and repaired.predict(photo_pixels(1)).shape == (1, 1000)
    with pytest.raises(seam.ModelConfigError, match="MODEL_CACHE_DIR=/proc/no-cache-here cannot be used"):
        load(cache_dir="/proc/no-cache-here")


def test_top_k_breaks_ties_in_class_order():
    probabilities = np.zeros(1000, np.float32)
    probabilities[[900, 500, 10]] = 0.3
    probabilities[7] = 0.1
    assert [p["index"] for p in seam.top_k(probabilities, [str(i) for i in range(1000)], 4)] == [10, 500, 900, 7]


def test_a_model_that_does_not_take_fixed_size_rgb_images_is_one_line_naming_the_setting(tmp_path):
    import keras

    labels = tmp_path / "labels.json"
    labels.write_text('["a", "b"]')
    for name, shape in (("any-size", (None, None, 3)), ("gray", (28, 28, 1))):
        inputs = keras.Input(shape)
        outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs))
        keras.Model(inputs, outputs).save(tmp_path / f"{name}.keras")
        with pytest.raises(
            seam.ModelConfigError, match=r"MODEL_PATH: the model must take RGB images of one fixed size"
        ):
            seam.load_classifier("", "", str(tmp_path / f"{name}.keras"), str(labels), runtime="keras")


def test_cuda_visible_devices_that_hides_every_gpu_means_no_gpu(monkeypatch):
    monkeypatch.setattr(seam.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    for hidden, expected in ((None, "/dev/nvidia0"), ("0", "/dev/nvidia0"), ("", ""), ("-1", ""), (" -1,0", "")):
        if hidden is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert seam.gpu_device() == expected, hidden


# Run in a fresh interpreter: every outgoing connection and every child process is recorded, then the
# model is converted (an empty cache) and run. The last line tries an outside address on purpose, so the
# recording is shown to work.
NO_NETWORK = """
import json, os, socket, subprocess, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    if self.family != socket.AF_UNIX and not str(address[0]).startswith(("127.", "::1", "localhost")):
        attempts.append(str(address))
        raise OSError("no network in this test")
    return real_connect(self, address)
socket.socket.connect = connect
real_popen = subprocess.Popen.__init__
def popen(self, *args, **kwargs):
    attempts.append("child process: " + str(args[0] if args else kwargs.get("args")))
    return real_popen(self, *args, **kwargs)
subprocess.Popen.__init__ = popen
os.fork = lambda: attempts.append("fork") or (_ for _ in ()).throw(OSError("no fork in this test"))
sys.path.insert(0, os.getcwd())
import classifier
model = classifier.load_classifier("ResNet50", sys.argv[1], labels_path=sys.argv[2], runtime="openvino",
                                   cache_dir=sys.argv[3])
model.predict(__import__("numpy").zeros((1, 224, 224, 3), "uint8"))
during = list(attempts)
try:
    socket.create_connection(("192.0.2.1", 80), timeout=0.1)
except OSError:
    pass
telemetry = repr(sys.modules.get("openvino_telemetry", "absent"))
print(json.dumps({"during": during, "probe": attempts[len(during):], "telemetry": telemetry}))
"""


@pytest.mark.slow
def test_converting_and_serving_with_openvino_opens_no_outside_connection(resnet_weights, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(resnet_weights), str(IMAGENET_INDEX), str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
        "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["probe"] == ["('192.0.2.1', 80)"]  # the recording works ...
    connections = [a for a in seen["during"] if not a.startswith("child process: ")]
    children = [a.removeprefix("child process: ") for a in seen["during"] if a not in connections]
    assert connections == [] and seen["telemetry"] == "None"  # ... and converting and serving opened none
    # and started no process but two local look-ups (Python's platform.processor(), matplotlib's font list,
    # imported by TensorFlow): telemetry's reporter, a Python child, would show here
    assert all(child.startswith(("['uname', '-p']", "['fc-list'")) for child in children), children
    assert list((tmp_path / "cache").glob("ResNet50-*.xml"))  # it did convert (an empty cache), and kept it
