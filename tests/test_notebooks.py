"""Execute every tutorial notebook top to bottom on a fresh kernel.

The notebooks are committed with their outputs, and carry no test plumbing.
After running a notebook, the test evaluates one expression in the same
kernel (a probe cell that is not part of the notebook) to read the numbers it
checks, and compares the numbers the committed outputs print with the ones
the fresh run prints.

Notebooks 01-04 use tf_keras and run in the tf_keras process; 05_keras3 uses
Keras 3 and runs in the Keras 3 JAX and torch processes, on a kernel whose
environment carries that process's ``KERAS_BACKEND``.
"""
import copy
import glob
import json
import os
import re
import sys

import pytest

import ipykernel  # noqa: E402,F401  (the notebooks' kernel)
import matplotlib  # noqa: E402,F401  (the notebooks plot)
import nbclient  # noqa: E402
import nbformat  # noqa: E402

pytestmark = pytest.mark.notebook

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = ["01_quickstart.ipynb", "02_mobilenetv2.ipynb", "03_to_the_phone.ipynb", "04_from_tfmot.ipynb",
             "05_keras3.ipynb"]
KERAS3_NOTEBOOKS = ["05_keras3.ipynb"]
KERAS3_NOTEBOOK_BACKENDS = ("jax", "torch")  # CI time: the TensorFlow backend is covered by the README test
FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow") if FLAVOUR == "keras3" else "tensorflow"
CELL_TIMEOUT = 300
PROBE = "__notebook_test__ "


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernelspec that runs this interpreter, found first via JUPYTER_PATH.

    The environment's own kernelspec may start ``python`` from ``PATH``, which
    need not be the interpreter running the tests (e.g. an unactivated venv).
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (keras_rebuild tests)",
        "language": "python",
    }
    if FLAVOUR == "keras3":  # the kernel imports Keras on this process's backend
        spec["env"] = {"KERAS_BACKEND": BACKEND}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MPLBACKEND")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
    os.environ.pop("MPLBACKEND", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def printed(nb) -> str:
    """Everything the code cells print (stdout streams and text results), in order."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
                if "image/png" not in out["data"]:
                    parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {}))


def run_notebook(name, tmp_path, probe: str):
    """Execute ``name`` in ``tmp_path``; return (executed notebook, value of the ``probe`` expression)."""
    nb = read(name)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    cell = nbformat.v4.new_code_cell(f"import json as _json\nprint({PROBE!r} + _json.dumps({probe}))")
    with client.setup_kernel():
        for index, c in enumerate(nb.cells):
            client.execute_cell(c, index)
        nb.cells.append(cell)
        client.execute_cell(cell, len(nb.cells) - 1)
    nb.cells.pop()
    for c in nb.cells:
        for out in c.get("outputs", []):
            assert out.output_type != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
    text = "".join(o.text for o in cell.outputs if o.output_type == "stream")
    line = [ln for ln in text.splitlines() if ln.startswith(PROBE)][-1]
    return nb, json.loads(line[len(PROBE):])


def numbers(pattern, text):
    """Every match of ``pattern`` (one group, a number, optional % and thousands commas) as floats."""
    return [float(m.replace(",", "")) for m in re.findall(pattern, text)]


def assert_committed_numbers_agree(name, fresh_nb, patterns):
    """The numbers the committed outputs print agree with the fresh run's, within each pattern's tolerance."""
    committed, fresh = printed(read(name)), printed(fresh_nb)
    for pattern, tol in patterns:
        a, b = numbers(pattern, committed), numbers(pattern, fresh)
        assert a and len(a) == len(b), (name, pattern, a, b)
        for u, v in zip(a, b):
            assert abs(u - v) <= tol, (name, pattern, a, b)


# ----------------------------------------------------------------------------- hygiene (fast)
@pytest.mark.tf_keras_only
def test_every_notebook_is_tested():
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert names == NOTEBOOKS


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_with_outputs_and_uses_only_the_public_api(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata["kernelspec"]["name"] == "python3"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    if name in KERAS3_NOTEBOOKS:  # plain Keras 3, on whatever backend KERAS_BACKEND names
        assert re.search(r"^import keras\b", first_code.source, re.M)
        source = "\n".join(c.source for c in nb.cells)
        assert "tf_keras" not in source and "TF_USE_LEGACY_KERAS" not in source
        assert "import tensorflow" not in source and "KERAS_BACKEND\"] =" not in source
    else:
        assert 'os.environ["TF_USE_LEGACY_KERAS"] = "1"' in first_code.source
        assert first_code.source.index("TF_USE_LEGACY_KERAS") < first_code.source.index("import tensorflow")
    assert "%matplotlib inline" in first_code.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "committed without running every cell"
    assert images(nb) >= 1 and printed(nb).strip()
    source = "\n".join(c.source for c in nb.cells)
    assert "_compat" not in source and "RESULTS_JSON" not in source
    assert not re.search(r"\bkr\._|keras_rebuild\.\w+\._|from keras_rebuild\.\w+ import", source), name
    outputs = json.dumps([c.get("outputs", []) for c in code])
    source = source.replace("/data/local/tmp/", "(phone folder)")  # the phone's folder in the adb commands
    for machine_path in (REPO_ROOT, "/home/", "/Users/", "C:\\\\", "site-packages", "/tmp/"):
        assert machine_path not in source and machine_path not in outputs, (name, machine_path)
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


# ----------------------------------------------------------------------------- executed
@pytest.mark.tf_keras_only
def test_quickstart_prunes_rebuilds_recovers_and_exports(kernel_env, tmp_path):
    nb, r = run_notebook("01_quickstart.ipynb", tmp_path, probe=(
        '{"dense": dense_accuracy, "pruned": pruned_accuracy, "recovered": after, "int8": int8_accuracy, '
        '"params_before": report.params_before, "params_after": report.params_after, "sweep": sweep}'))
    assert images(nb) >= 2  # channels kept per layer, accuracy vs sparsity
    assert r["dense"] > 0.9
    assert r["pruned"] < r["dense"] - 0.05 < r["recovered"]  # pruning costs accuracy; recovery brings it back
    assert r["params_after"] < 0.5 * r["params_before"]
    assert r["int8"] > r["recovered"] - 0.03
    text = printed(nb)
    assert re.search(r"before pruning\s+\d", text) and re.search(r"after pruning\s+\d", text) \
        and re.search(r"after recovery\s+\d", text)
    sweep = r["sweep"]
    assert sweep["sparsity"] == [0.0, 0.25, 0.5, 0.75]
    assert sweep["params"] == sorted(sweep["params"], reverse=True)
    assert sweep["before"][0] == pytest.approx(r["dense"])
    assert sweep["after"][-1] >= sweep["before"][-1]  # recovery helps at 75%
    assert_committed_numbers_agree("01_quickstart.ipynb", nb, [
        (r"before pruning\s+([\d.]+)%", 2.0), (r"after recovery\s+([\d.]+)%", 3.0),
        (r"sparsity [\d.]+: params\s+([\d,]+)", 0), (r"int8 TFLite test accuracy: ([\d.]+)%", 3.0),
    ])


@pytest.mark.tf_keras_only
def test_mobilenetv2_notebook_rebuilds_exactly_on_varying_logits_and_gets_faster(kernel_env, tmp_path):
    nb, r = run_notebook("02_mobilenetv2.ipynb", tmp_path, probe=(
        '{"groups": len(groups), "prunable": len(prunable), "max_diff": max_diff, "spread": spread, '
        '"params_before": rep_local.params_before, "params_local": rep_local.params_after, '
        '"params_global": rep_global.params_after, "latency_ms": latency.medians_ms, '
        '"bytes": {k: v.size_bytes for k, v in exports.items()}}'))
    assert images(nb) >= 2  # channels kept per group, latency/size bars
    assert 0 < r["prunable"] < r["groups"]
    # The check means something: logits differ across inputs by far more than the tolerance.
    assert r["spread"] > 1e3 * max(r["max_diff"], 1e-6) and r["spread"] > 1e-3
    assert r["max_diff"] < 1e-3
    assert r["params_local"] < 0.5 * r["params_before"]
    assert r["params_global"] < r["params_before"]
    dense_ms, small_ms = r["latency_ms"]["dense"], r["latency_ms"]["rebuilt (local 50%)"]
    assert small_ms < dense_ms
    assert r["bytes"]["rebuilt (local 50%)"] < 0.5 * r["bytes"]["dense"]
    assert_committed_numbers_agree("02_mobilenetv2.ipynb", nb, [
        (r"(\d+) groups, \d+ prunable", 0), (r"local : params [\d,]+ -> ([\d,]+)", 0),
        (r"global: params [\d,]+ -> ([\d,]+)", 0),
    ])


@pytest.mark.tf_keras_only
def test_to_the_phone_notebook_compares_four_export_modes_and_names_its_folder(kernel_env, tmp_path):
    nb, r = run_notebook("03_to_the_phone.ipynb", tmp_path, probe='{"rows": rows, "keras_accuracy": accuracy(small), "out": OUT}')
    assert images(nb) >= 1
    rows = r["rows"]
    assert list(rows) == ["float32", "float16", "dynamic", "int8"]
    assert rows["float16"]["bytes"] < rows["float32"]["bytes"]
    assert rows["int8"]["bytes"] < rows["float16"]["bytes"]
    assert rows["dynamic"]["bytes"] < rows["float16"]["bytes"]
    assert rows["float32"]["accuracy"] == pytest.approx(r["keras_accuracy"], abs=1e-9)
    for mode in rows:
        assert rows[mode]["accuracy"] > r["keras_accuracy"] - 0.03, mode
        assert rows[mode]["latency_ms"] > 0
    # The phone steps push files that exist, from the folder the notebook prints.
    for mode in rows:
        assert (tmp_path / r["out"] / f"digits_{mode}.tflite").is_file()
    text = printed(nb)
    assert r["out"] in text
    source = "\n".join(c.source for c in nb.cells)
    assert "litert benchmark" in source and "--android" in source
    assert f"adb push {r['out']}/digits_int8.tflite" in source
    assert_committed_numbers_agree("03_to_the_phone.ipynb", nb, [
        (r"dense test accuracy: ([\d.]+)%", 2.0), (r"rebuilt: ([\d,]+) params", 0),
    ])


@pytest.mark.tf_keras_only
def test_from_tfmot_notebook_keeps_the_dense_row_dense_and_shrinks_only_with_channels(kernel_env, tmp_path):
    nb, r = run_notebook("04_from_tfmot.ipynb", tmp_path, probe=(
        '{"bytes": {k: v.size_bytes for k, v in files.items()}, "latency_ms": latency.medians_ms, '
        '"accuracy": acc, "zeros": zeros, "dense_after_training": dense_accuracy}'))
    assert images(nb) >= 1
    dense, tf_row, kr_row = "dense", "tfmot 60% weights", "keras_rebuild 60% channels"
    acc, zeros, size = r["accuracy"], r["zeros"], r["bytes"]
    # tfmot trained its own copy: the dense row is still the model printed after training, not tfmot's.
    assert acc[dense] == r["dense_after_training"]
    assert zeros[dense] < 0.01 and zeros[tf_row] > 0.55
    assert (acc[dense], zeros[dense]) != (acc[tf_row], zeros[tf_row])
    assert size[tf_row] > 0.9 * size[dense]
    assert size[kr_row] < 0.5 * size[dense]
    assert r["latency_ms"][kr_row] < r["latency_ms"][tf_row]
    assert acc[kr_row] > acc[dense] - 0.05
    assert acc[tf_row] > acc[dense] - 0.05
    assert_committed_numbers_agree("04_from_tfmot.ipynb", nb, [
        (r"dense test accuracy: ([\d.]+)%", 2.0), (r"zero kernel weights: ([\d.]+)%", 2.0),
        (r"parameters ([\d,]+) \(dense", 0),
    ])


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND not in KERAS3_NOTEBOOK_BACKENDS,
                    reason=f"05_keras3 runs on {KERAS3_NOTEBOOK_BACKENDS} (CI time)")
def test_keras3_notebook_prunes_during_fit_rebuilds_exactly_recovers_and_exports(kernel_env, tmp_path):
    nb, r = run_notebook("05_keras3.ipynb", tmp_path, probe=(
        '{"backend": keras.backend.backend(), "dense": dense_accuracy, "pruned": pruned_accuracy, '
        '"recovered": recovered_accuracy, "tflite": tflite_accuracy, "tflite_diff": tflite_diff, '
        '"max_diff": max_diff, "zeros": zeros, "params_before": report.params_before, '
        '"params_after": report.params_after, "model_module": type(model).__module__}'))
    assert r["backend"] == BACKEND  # the kernel ran on this process's backend
    assert r["model_module"].split(".")[0] == "keras"
    assert images(nb) >= 1
    assert r["dense"] > 0.9
    # The schedule reached its 60% target during fit, and the masks are in force after it.
    for name, (zero, total) in r["zeros"].items():
        assert zero / total >= 0.55, (name, zero, total)
    assert r["max_diff"] < 1e-4  # rebuilt == stripped
    assert r["params_after"] < 0.5 * r["params_before"]
    assert r["recovered"] > r["dense"] - 0.03
    assert r["tflite"] == pytest.approx(r["recovered"], abs=0.006) and r["tflite_diff"] < 1e-4
    assert_committed_numbers_agree("05_keras3.ipynb", nb, [
        (r"dense test accuracy: ([\d.]+)%", 3.0), (r"after recovery ([\d.]+)%", 3.0),
        (r"(\d+) of \d+ channels zero", 0), (r"params [\d,]+ -> ([\d,]+);", 0),
        (r"LiteRT test accuracy: ([\d.]+)%", 3.0),
    ])
