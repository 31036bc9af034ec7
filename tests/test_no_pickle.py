"""No pickle anywhere: queue messages and answers are JSON, and no source file pickles or loads unsafely."""

import ast
import os
import secrets

from support import ROOT

KEY_A, KEY_B = secrets.token_hex(16), secrets.token_hex(16)


PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def pickle_uses(source: str) -> list[str]:
    """What in this Python source can run code hidden in data: a pickling module, or a loader told to allow it.

    Parsed, not grepped: words in strings and comments do not count, and `import pickle as p` does.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            name = ast.unparse(node.func)
            for flag in ("allow_pickle", "safe_mode"):  # numpy's and Keras' switches for unsafe loading
                if flag in keywords and not (
                    isinstance(keywords[flag], ast.Constant) and keywords[flag].value is (flag == "safe_mode")
                ):
                    found.append(f"{name}({flag}={ast.unparse(keywords[flag])})")
            if name in ("np.load", "numpy.load") and "allow_pickle" not in keywords:
                found.append(f"{name}() without allow_pickle=False")
    return found


def test_the_pickle_detector_catches_each_form_and_passes_safe_code():
    unsafe = {
        "import pickle": 1,
        "import pickle as p": 1,
        "import os, cPickle": 1,
        "from dill import loads": 1,
        "import marshal": 1,
        "from joblib import load": 1,
        "np.load(path)": 1,
        "numpy.load(path, allow_pickle=True)": 1,
        "np.load(path, allow_pickle=flag)": 1,
        "keras.models.load_model(path, safe_mode=False)": 1,
    }
    for source, count in unsafe.items():
        assert len(pickle_uses(source)) == count, source
    safe = "np.load(path, allow_pickle=False)\nkeras.models.load_model(path)\nx = 'import pickle'  # pickle\n"
    assert pickle_uses(safe) == []


def test_no_pickle_anywhere_in_the_repository():
    sources = {}
    for directory, subdirectories, names in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"]  # .venv, .git
        for name in names:
            if name.endswith((".py", ".wsgi")):
                path = os.path.join(directory, name)
                sources[os.path.relpath(path, ROOT)] = path
    assert {"run_web_server.py", "run_model_server.py", "image_queue.py", "helpers.py", "classifier.py"} <= set(sources)
    assert {"keras_rest_api_app.wsgi", "tests/conftest.py", "tests/test_security.py"} <= set(sources)
    offences = {name: uses for name, path in sources.items() if (uses := pickle_uses(open(path).read()))}
    assert offences == {}
