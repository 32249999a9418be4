"""The keras-rebuild command line: happy paths and the errors users hit."""
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild import cli
from keras_rebuild._compat import keras


@pytest.fixture
def model_file(tmp_path):
    path = str(tmp_path / "digits.keras")
    kr.digits_cnn(width=8).save(path)
    return path


def test_inspect_prints_groups_and_costs(model_file, capsys):
    assert cli.main(["inspect", model_file]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "conv1" in out and "prunable" in out and "MACs" in out


def test_prune_writes_a_smaller_model_and_refuses_to_overwrite(model_file, tmp_path, capsys):
    out_path = str(tmp_path / "small.keras")
    assert cli.main(["prune", model_file, "--sparsity", "0.5", "-o", out_path]) == 0
    small = keras.models.load_model(out_path)
    assert small.count_params() < keras.models.load_model(model_file).count_params() * 0.6
    assert "total" in capsys.readouterr().out
    before = os.path.getmtime(out_path)
    assert cli.main(["prune", model_file, "--sparsity", "0.5", "-o", out_path]) == 2
    assert "--force" in capsys.readouterr().err
    assert os.path.getmtime(out_path) == before
    assert cli.main(["prune", model_file, "--sparsity", "0.5", "-o", out_path, "--force"]) == 0


def test_prune_rejects_bad_sparsity_with_exit_status_2(model_file, tmp_path, capsys):
    assert cli.main(["prune", model_file, "--sparsity", "1.5", "-o", str(tmp_path / "x.keras")]) == 2
    assert "sparsity" in capsys.readouterr().err


def test_missing_and_wrongly_formatted_models_are_clear_errors(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.keras")]) == 2
    assert "No such model file" in capsys.readouterr().err
    bad = tmp_path / "model.txt"
    bad.write_text("hello")
    assert cli.main(["inspect", str(bad)]) == 2
    assert "Expected a model file" in capsys.readouterr().err
    fake = tmp_path / "fake.h5"
    fake.write_text("not hdf5")
    assert cli.main(["inspect", str(fake)]) == 2
    assert "HDF5" in capsys.readouterr().err


def save_lambda_model(path):
    """A model with a Lambda layer (code stored in the file), saved at ``path``."""
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2)(inp))).save(str(path))
    return str(path)


def test_h5_with_lambda_needs_unsafe(tmp_path, capsys):
    path = save_lambda_model(tmp_path / "lambda.h5")
    assert cli.main(["inspect", path]) == 2
    assert "--unsafe" in capsys.readouterr().err
    assert cli.main(["inspect", path, "--unsafe"]) == 0


def test_keras_file_with_lambda_is_refused_in_safe_mode(tmp_path, capsys):
    path = save_lambda_model(tmp_path / "lambda.keras")
    assert cli.main(["inspect", path]) == 2
    assert "safe" in capsys.readouterr().err.lower()


def test_export_and_bench(model_file, tmp_path, capsys):
    out = str(tmp_path / "m.tflite")
    assert cli.main(["export", model_file, "-o", out]) == 0
    assert os.path.getsize(out) > 0
    calib = str(tmp_path / "calib.npy")
    np.save(calib, np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32))
    out8 = str(tmp_path / "m8.tflite")
    assert cli.main(["export", model_file, "-o", out8, "--quantize", "int8", "--calibration", calib]) == 0
    assert os.path.getsize(out8) < os.path.getsize(out)
    capsys.readouterr()
    assert cli.main(["bench", out, out8, "--runs", "5"]) == 0
    text = capsys.readouterr().out
    assert "m.tflite" in text and "m8.tflite" in text
    assert cli.main(["export", model_file, "-o", out]) == 2  # exists, no --force
