"""Execute every tutorial notebook top to bottom on a fresh kernel.

Each notebook ends with a cell printing ``RESULTS_JSON {...}``; the tests read
those numbers back and check what the notebook claims.
"""
import glob
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.notebook

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
CELL_TIMEOUT = 300


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernelspec that runs this interpreter, found first via JUPYTER_PATH.

    The environment's own kernelspec may start ``python`` from ``PATH``, which
    need not be the interpreter running the tests (e.g. an unactivated venv).
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (keras_rebuild tests)",
        "language": "python",
    }))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "TF_USE_LEGACY_KERAS", "MPLBACKEND")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.pop("MPLBACKEND", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_notebook(name, tmp_path):
    path = os.path.join(NOTEBOOK_DIR, name)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} is committed with outputs"
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    images = 0
    results = None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            assert out.output_type != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type in ("display_data", "execute_result") and "image/png" in out.get("data", {}):
                images += 1
            if out.output_type == "stream" and "RESULTS_JSON " in out.text:
                line = [ln for ln in out.text.splitlines() if ln.startswith("RESULTS_JSON ")][-1]
                results = json.loads(line[len("RESULTS_JSON "):])
    assert results is not None, f"{name} printed no RESULTS_JSON"
    return images, results


def test_every_notebook_is_tested():
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert names == ["01_quickstart.ipynb", "02_mobilenetv2.ipynb", "03_to_the_phone.ipynb", "04_from_tfmot.ipynb"]


def test_notebooks_are_valid_v4_with_python3_kernel_and_set_legacy_keras_first():
    for path in sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb"))):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        assert nb.metadata["kernelspec"]["name"] == "python3"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert 'os.environ["TF_USE_LEGACY_KERAS"] = "1"' in first_code.source
        assert "%matplotlib inline" in first_code.source
        text = "\n".join(c.source for c in nb.cells)
        repo_root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
        for machine_path in (repo_root, "/home/", "/Users/", "C:\\"):
            assert machine_path not in text, (path, machine_path)


def test_quickstart_prunes_rebuilds_recovers_and_exports(kernel_env, tmp_path):
    images, r = run_notebook("01_quickstart.ipynb", tmp_path)
    assert images >= 2  # channels kept per layer, accuracy vs sparsity
    assert r["dense_accuracy"] > 0.9
    assert r["params_after"] < 0.5 * r["params_before"]
    assert r["rebuilt_accuracy"] > r["dense_accuracy"] - 0.05
    assert r["int8_accuracy"] > r["rebuilt_accuracy"] - 0.03
    sweep = r["sweep"]
    assert sweep["sparsity"] == [0.0, 0.25, 0.5, 0.75]
    assert sweep["params"] == sorted(sweep["params"], reverse=True)
    assert sweep["before"][0] == pytest.approx(r["dense_accuracy"])
    assert sweep["after"][-1] >= sweep["before"][-1]  # recovery helps at 75%


def test_mobilenetv2_notebook_rebuilds_exactly_and_gets_faster(kernel_env, tmp_path):
    images, r = run_notebook("02_mobilenetv2.ipynb", tmp_path)
    assert images >= 2  # channels kept per group, latency/size bars
    assert 0 < r["prunable_groups"] < r["groups"]
    assert r["max_diff"] < 1e-3
    assert r["params_local"] < 0.5 * r["params_before"]
    assert r["params_global"] < r["params_before"]
    dense_ms, small_ms = r["latency_ms"]["dense"], r["latency_ms"]["rebuilt (local 50%)"]
    assert small_ms < dense_ms
    assert r["bytes"]["rebuilt (local 50%)"] < 0.5 * r["bytes"]["dense"]


def test_to_the_phone_notebook_compares_four_export_modes(kernel_env, tmp_path):
    images, r = run_notebook("03_to_the_phone.ipynb", tmp_path)
    assert images >= 1
    rows = r["rows"]
    assert list(rows) == ["float32", "float16", "dynamic", "int8"]
    assert rows["float16"]["bytes"] < rows["float32"]["bytes"]
    assert rows["int8"]["bytes"] < rows["float16"]["bytes"]
    assert rows["dynamic"]["bytes"] < rows["float16"]["bytes"]
    assert rows["float32"]["accuracy"] == pytest.approx(r["keras_accuracy"], abs=1e-9)
    for mode in rows:
        assert rows[mode]["accuracy"] > r["keras_accuracy"] - 0.03, mode
        assert rows[mode]["latency_ms"] > 0


def test_from_tfmot_notebook_shows_channel_pruning_shrinks_the_file_and_weight_pruning_does_not(kernel_env, tmp_path):
    images, r = run_notebook("04_from_tfmot.ipynb", tmp_path)
    assert images >= 1
    size = r["bytes"]
    assert size["tfmot 60% weights"] > 0.9 * size["dense"]
    assert size["keras_rebuild 60% channels"] < 0.5 * size["dense"]
    assert r["latency_ms"]["keras_rebuild 60% channels"] < r["latency_ms"]["tfmot 60% weights"]
    acc = r["accuracy"]
    assert acc["keras_rebuild 60% channels"] > acc["dense"] - 0.05
    assert acc["tfmot 60% weights"] > acc["dense"] - 0.05
