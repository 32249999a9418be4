"""The end-to-end demo: prune -> rebuild -> recover -> export on digits."""
import os

import pytest

from keras_rebuild.demo import OUTPUT_FILES, main, run_demo
from keras_rebuild.errors import InvalidArgumentError, OutputExistsError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(quick=True, output_dir=str(out))


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
    assert "--output-dir" in out and "--quick" in out
