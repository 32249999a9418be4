"""The end-to-end demo: prune -> rebuild -> recover -> export on digits.

The demo runs on Keras 3 by default and on tf_keras with ``--flavour tf_keras``.
The full run (about a minute) happens once per flavour: tf_keras in the tf_keras
process, Keras 3 in the Keras 3 TensorFlow process (the backend a fresh
``pip install ".[demo]"`` gives). The JAX and torch processes run the cheap
argument tests only; the README's Quickstart test covers the pipeline there.
"""
import inspect
import os

import pytest

from keras_rebuild.demo import FLAVOURS, OUTPUT_FILES, build_parser, main, run_demo
from keras_rebuild.errors import InvalidArgumentError, OutputExistsError

FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow") if FLAVOUR == "keras3" else "tensorflow"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if BACKEND != "tensorflow":
        pytest.skip("the full demo runs in the tf_keras and Keras 3 TensorFlow processes (CI time)")
    out = tmp_path_factory.mktemp("demo")
    return run_demo(quick=True, output_dir=str(out), flavour=FLAVOUR)


def test_demo_runs_on_the_flavour_it_was_asked_for(demo):
    assert demo["flavour"] == FLAVOUR and demo["backend"] == "tensorflow"
    assert ("Keras 3, tensorflow backend" if FLAVOUR == "keras3" else "(tf_keras)") in demo["table"]


def test_demo_defaults_to_keras3_with_a_tf_keras_option():
    assert FLAVOURS == ("keras3", "tf_keras")
    assert inspect.signature(run_demo).parameters["flavour"].default == "keras3"
    assert build_parser().parse_args([]).flavour == "keras3"
    assert build_parser().parse_args(["--flavour", "tf_keras"]).flavour == "tf_keras"


def test_demo_rejects_an_unknown_flavour_before_writing_anything(tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match="flavour='keras2'"):
        run_demo(quick=True, flavour="keras2", output_dir=str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["--flavour", "keras2", "-o", str(tmp_path)])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_rebuilt_model_has_less_than_half_the_params_and_macs(demo):
    dense, rebuilt = demo["dense"], demo["rebuilt"]
    assert rebuilt["params"] < dense["params"] / 2
    assert rebuilt["macs"] < dense["macs"] / 2
    assert demo["report"].params_after == rebuilt["params"]


def test_demo_int8_files_are_smaller_than_float32(demo):
    for name in ("dense", "rebuilt"):
        assert demo[name]["tflite_int8_bytes"] < demo[name]["tflite_float32_bytes"]
    assert demo["rebuilt"]["tflite_float32_bytes"] < demo["dense"]["tflite_float32_bytes"]


def test_demo_tflite_files_exist_with_the_reported_sizes(demo):
    for name in OUTPUT_FILES:
        assert os.path.isfile(os.path.join(demo["output_dir"], name)), name
    for name in ("dense", "rebuilt"):
        for q in ("float32", "int8"):
            path = demo[name]["paths"][q]
            assert os.path.getsize(path) == demo[name][f"tflite_{q}_bytes"]


def test_demo_recovered_accuracy_is_within_a_few_points_of_dense(demo):
    dense, rebuilt = demo["dense"], demo["rebuilt"]
    assert dense["accuracy_keras"] > 0.9
    assert rebuilt["accuracy_keras"] > dense["accuracy_keras"] - 0.04
    assert rebuilt["accuracy_int8_tflite"] > rebuilt["accuracy_keras"] - 0.03
    assert dense["accuracy_int8_tflite"] > dense["accuracy_keras"] - 0.03


def test_demo_latencies_are_positive_and_table_lists_every_metric(demo):
    for name in ("dense", "rebuilt"):
        assert demo[name]["latency_float32_ms"] > 0
        assert demo[name]["latency_int8_ms"] > 0
    table = demo["table"]
    for label in ("params", "MACs", ".tflite float32", ".tflite int8", "latency", "accuracy (int8 TFLite)"):
        assert label in table
    assert f"{demo['rebuilt']['params']:,}" in table


def test_demo_refuses_to_overwrite_existing_outputs(demo):
    with pytest.raises(OutputExistsError, match="overwrite"):
        run_demo(quick=True, output_dir=demo["output_dir"])


def test_demo_main_reports_existing_outputs_with_status_2(demo, capsys):
    assert main(["--quick", "-q", "-o", demo["output_dir"]]) == 2
    assert "error:" in capsys.readouterr().out


def test_demo_rejects_sparsity_of_one(tmp_path):
    with pytest.raises(InvalidArgumentError, match="sparsity=1.0"):
        run_demo(quick=True, sparsity=1.0, output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_python_dash_m_demo_passes_options_through_to_the_demo(capsys):
    from keras_rebuild.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--output-dir" in out and "--quick" in out and "--flavour" in out and "tf_keras" in out
