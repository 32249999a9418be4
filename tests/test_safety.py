"""Safe by default: crafted model files run no code, outputs survive races, signals and hostile folders.

Crafted-file tests check that a marker file is NOT created by any CLI command
(the file's code would create it if it ran). Write tests check atomicity,
exclusivity, symlinks, permissions and cleanup.
"""
import errno
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile

import h5py
import numpy as np
import pytest

from keras_rebuild import cli, io as kio, safety
from keras_rebuild._compat import keras
from keras_rebuild.errors import KerasRebuildError, OutputExistsError

COMMANDS = [
    ["inspect"],
    ["prune", "--sparsity", "0.5", "-o", "{out}/small.keras"],
    ["export", "-o", "{out}/m.tflite"],
    ["recover", "--data", "{out}/train.npz", "--epochs", "1", "-o", "{out}/rec.keras"],
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def marker_lambda_model(marker):
    """A tf_keras model whose Lambda creates ``marker`` when it runs (its code is stored in the file)."""
    inp = keras.Input((4,))
    x = keras.layers.Lambda(lambda t, p=str(marker): (open(p, "w").close(), t)[1], name="evil")(inp)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(x))


def run_every_command(path, tmp_path, capsys, extra=()):
    """Run each model command on ``path``; return the stderr lines of each."""
    errs = []
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 4), "float32"), y=np.zeros(4, "int64"))
    for cmd in COMMANDS:
        argv = [a.format(out=tmp_path) for a in cmd[:1] + [str(path)] + cmd[1:]] + list(extra)
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err  # exactly one line, never a traceback
        errs.append(err[0])
    return errs


def assert_refused_without_running(path, marker, tmp_path, capsys, layer="evil", name="Lambda"):
    assert not os.path.exists(marker)
    for line in run_every_command(path, tmp_path, capsys):
        assert layer in line and name in line and "--unsafe" in line, line
    assert not os.path.exists(marker), "the model file's code ran"


# ---------------------------------------------------------------------------- 1. SavedModel folders
def test_savedmodel_with_lambda_is_refused_by_every_command_and_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil_savedmodel")
    marker_lambda_model(marker).save(path, save_format="tf")
    if marker.exists():
        marker.unlink()  # saving traced the Lambda
    assert_refused_without_running(path, marker, tmp_path, capsys)


def test_savedmodel_without_keras_metadata_is_refused_as_uncheckable(tmp_path, capsys):
    path = tmp_path / "plain_sm"
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(str(path), save_format="tf")
    (path / "keras_metadata.pb").unlink()
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "keras_metadata.pb" in err and "--unsafe" in err


# ---------------------------------------------------------------------------- 2. HDF5 named .keras
def test_hdf5_file_named_keras_is_checked_as_hdf5(tmp_path, capsys):
    marker = tmp_path / "ran"
    h5 = tmp_path / "evil.h5"
    marker_lambda_model(marker).save(str(h5))
    path = tmp_path / "evil.keras"
    os.replace(h5, path)
    if marker.exists():
        marker.unlink()
    assert_refused_without_running(path, marker, tmp_path, capsys)


# ---------------------------------------------------------------------------- 3. substring evasion
def _rewrite_h5_config(path, transform):
    with h5py.File(path, "r+") as f:
        config = f.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        f.attrs["model_config"] = transform(json.loads(config))


@pytest.mark.parametrize("encoding", ["compact", "unicode_escape"])
def test_h5_lambda_check_parses_the_config_instead_of_matching_substrings(tmp_path, capsys, encoding):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.h5"
    marker_lambda_model(marker).save(str(path))
    if marker.exists():
        marker.unlink()
    if encoding == "compact":
        _rewrite_h5_config(path, lambda c: json.dumps(c, separators=(",", ":")))
    else:
        _rewrite_h5_config(path, lambda c: json.dumps(c).replace('"Lambda"', '"\\u004cambda"'))
    assert_refused_without_running(path, marker, tmp_path, capsys)


# ---------------------------------------------------------------------------- 4. function from a module
def craft_keras3_os_system(path, marker):
    """A genuine Keras 3 .keras zip whose Lambda names ``os.system`` and calls it on a constant string."""
    import keras as keras3

    inp = keras3.Input((4,), name="x")
    keras3.Model(inp, keras3.layers.Dense(2, name="head")(inp)).save(str(path))
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"].append({
        "module": "keras.layers", "class_name": "Lambda", "registered_name": None, "name": "evil",
        "config": {"name": "evil", "trainable": True, "arguments": {}, "function_type": "function",
                   "function": {"module": "os", "class_name": "function", "config": "system",
                                "registered_name": "function"}},
        "inbound_nodes": [{"args": [f"touch {marker}"], "kwargs": {}}],
    })
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return str(path)


def craft_tf_keras_os_system(path, marker):
    """A genuine tf_keras .keras zip whose Lambda names ``os.popen`` and calls it on a constant string.

    tf_keras' safe mode refuses only ``function_type == "lambda"``: loading this file with
    ``safe_mode=True`` runs ``touch marker``.
    """
    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Dense(2, name="head")(inp)).save(str(path))
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"].append({
        "module": "keras.layers", "class_name": "Lambda", "registered_name": None, "name": "evil",
        "config": {"name": "evil", "trainable": True, "dtype": "float32",
                   "function": {"module": "os", "class_name": "function", "config": "popen",
                                "registered_name": "function"},
                   "function_type": "function", "module": "os", "output_shape": None,
                   "output_shape_type": "raw", "output_shape_module": None, "arguments": {}},
        "inbound_nodes": [[["_CONSTANT_VALUE", -1, f"touch {marker}", {}]]],
    })
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return str(path)


@pytest.mark.parametrize("craft", [craft_tf_keras_os_system, craft_keras3_os_system], ids=["tf_keras", "keras3"])
def test_lambda_naming_os_system_is_refused_and_runs_no_code(tmp_path, capsys, craft):
    marker = tmp_path / "ran"
    path = craft(tmp_path / "evil.keras", marker)
    info = safety.read_model_file(path)
    assert info.format == "keras"
    assert info.flavour == ("tf_keras" if craft is craft_tf_keras_os_system else "keras3")
    assert_refused_without_running(path, marker, tmp_path, capsys)


def test_the_crafted_tf_keras_file_does_run_code_under_keras_own_safe_mode(tmp_path):
    """Why our own check is needed: Keras' safe mode lets the crafted file run ``touch``."""
    marker = tmp_path / "ran"
    path = craft_tf_keras_os_system(tmp_path / "evil.keras", marker)
    try:
        keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception:  # noqa: BLE001 - the damage happens before any error
        pass
    deadline = time.time() + 10  # os.popen runs the shell asynchronously
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()


def test_function_named_from_an_arbitrary_module_is_refused_even_outside_a_lambda(tmp_path):
    import keras as keras3

    path = tmp_path / "act.keras"
    inp = keras3.Input((4,))
    keras3.Model(inp, keras3.layers.Dense(2, name="head")(inp)).save(str(path))
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["config"]["activation"] = {
        "module": "os", "class_name": "function", "config": "system", "registered_name": "function"}
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    with pytest.raises(safety.UnsafeModelError) as excinfo:
        safety.load_model(str(path))
    assert "head" in str(excinfo.value) and "'system'" in str(excinfo.value) and "'os'" in str(excinfo.value)


def test_unknown_class_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "m.keras"
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2, name="head")(inp)).save(str(path))
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1].update(module="mystery.layers", class_name="Mystery")
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "head" in err and "Mystery" in err and "mystery.layers" in err


# ---------------------------------------------------------------------------- trusted files still load
def test_unsafe_still_loads_trusted_lambda_files_and_keras_models_pass_the_check(tmp_path):
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2)(inp)))
    for name in ("l.keras", "l.h5"):
        model.save(str(tmp_path / name))
        with pytest.raises(safety.UnsafeModelError):
            safety.load_model(str(tmp_path / name))
        assert safety.load_model(str(tmp_path / name), unsafe=True).count_params() == model.count_params()


def test_keras3_and_tf_keras_files_load_in_their_own_flavour(tmp_path):
    import keras as keras3

    inp = keras3.Input((8, 8, 3))
    x = keras3.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras3.ops.mean(x + 1.0, axis=(1, 2))
    keras3.Model(inp, keras3.layers.Dense(2, activation="softmax")(x)).save(str(tmp_path / "k3.keras"))
    m3 = safety.load_model(str(tmp_path / "k3.keras"))
    assert type(m3).__module__.split(".")[0] == "keras"
    inp = keras.Input((8, 8, 3))
    keras.Model(inp, keras.layers.Conv2D(4, 3)(inp) + 1.0).save(str(tmp_path / "k2.keras"))
    m2 = safety.load_model(str(tmp_path / "k2.keras"))
    assert type(m2).__module__.split(".")[0] == "tf_keras"


# ---------------------------------------------------------------------------- tf_keras .keras loading
def _weighted_tf_keras_model(seed=0):
    """A small tf_keras model with conv, BN (moving statistics), dense and a nested model, random weights."""
    inner_in = keras.Input((3, 3, 6))
    inner = keras.Model(inner_in, keras.layers.Conv2D(5, 1, name="inner_conv")(inner_in), name="inner")
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = inner(keras.layers.ReLU()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


class _Spy:
    """Records what tf_keras' ``H5IOStore`` is opened on."""

    def __init__(self, monkeypatch):
        from tf_keras.src.saving import saving_lib

        self.sources = []
        original = saving_lib.H5IOStore

        def store(root_path, *args, **kwargs):
            self.sources.append((root_path, kwargs.get("archive", args[0] if args else None)))
            return original(root_path, *args, **kwargs)

        monkeypatch.setattr(saving_lib, "H5IOStore", store)


@pytest.mark.parametrize("where", ["memory", "temporary_file"])
def test_tf_keras_keras_archive_loads_the_weights_tf_keras_loads(tmp_path, monkeypatch, where):
    """Our loader reads model.weights.h5 in one pass (not through the zip member tf_keras seeks in)."""
    model = _weighted_tf_keras_model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    expected = keras.models.load_model(path, compile=False)
    if where == "temporary_file":
        monkeypatch.setattr(safety, "MAX_IN_MEMORY_WEIGHTS", 0)
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.mkdir(tmp_path / "tmp")
    loaded = safety.load_model(path)
    (source, archive), = spy.sources
    assert archive is None  # not the archive's ZipExtFile
    if where == "memory":
        assert isinstance(source, io.BytesIO)
    else:
        assert isinstance(source, str) and source.endswith(".h5")
        assert not os.listdir(tmp_path / "tmp")  # the temporary copy is gone
    assert [w.name for w in loaded.weights] == [w.name for w in expected.weights]
    for got, want, original in zip(loaded.get_weights(), expected.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, original)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_tf_keras_keras_archive_restores_the_compiled_state_only_with_compile(tmp_path):
    model = _weighted_tf_keras_model()
    model.compile(keras.optimizers.SGD(0.25), "mse", metrics=["mae"])
    path = str(tmp_path / "c.keras")
    model.save(path)
    compiled = safety.load_model(path, compile=True)
    assert isinstance(compiled.optimizer, keras.optimizers.SGD)
    assert float(compiled.optimizer.learning_rate.numpy()) == 0.25 and compiled.loss == "mse"
    plain = safety.load_model(path)
    assert getattr(plain, "optimizer", None) is None and getattr(plain, "compiled_loss", None) is None
    for got, want in zip(compiled.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_tf_keras_keras_archive_loader_keeps_safe_mode_and_our_checks(tmp_path):
    # tf_keras' own safe mode stays on: a bytecode lambda is refused by the fast path itself.
    inp = keras.Input((4,))
    lam = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2, name="double")(inp))
    lam_path = str(tmp_path / "lam.keras")
    lam.save(lam_path)
    with pytest.raises(ValueError, match="safe_mode"):
        safety._load_tf_keras_archive(lam_path, compile=False, safe_mode=True)
    assert safety._load_tf_keras_archive(lam_path, compile=False, safe_mode=False).count_params() == 0
    with pytest.raises(safety.UnsafeModelError, match="double"):
        safety.load_model(lam_path)
    # Our check still runs first: the crafted os.popen file (which tf_keras' safe mode lets run) is refused.
    marker = tmp_path / "ran"
    evil = craft_tf_keras_os_system(tmp_path / "evil.keras", marker)
    with pytest.raises(safety.UnsafeModelError, match="'evil'.*'Lambda'"):
        safety.load_model(evil)
    assert not marker.exists()


def _tensorflow_records(monkeypatch):
    """Messages TensorFlow's logger lets through (its filters applied), collected in a list."""
    import logging

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("tensorflow")
    handler = Collect()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    return records, lambda: logger.removeHandler(handler)


def _metrics_tf_keras_cannot_prebuild():
    """A compiled two-output model whose metric list tf_keras cannot build before training (3 for 2 outputs)."""
    inp = keras.Input((4,))
    model = keras.Model(inp, [keras.layers.Dense(2, name="a")(inp), keras.layers.Dense(3, name="b")(inp)])
    model.compile("adam", ["mse", "mse"], metrics=[["mae"], ["mae"], ["mae"]])
    return model


def test_loading_a_compiled_model_does_not_show_the_compiled_metrics_warning(tmp_path, monkeypatch):
    import logging

    warning = "Compiled the loaded model, but the compiled metrics"
    path = str(tmp_path / "c.h5")
    _metrics_tf_keras_cannot_prebuild().save(path)
    filters_before = list(logging.getLogger("tensorflow").filters)
    records, done = _tensorflow_records(monkeypatch)
    try:
        keras.models.load_model(path, compile=True)  # tf_keras' own loader logs it
        assert any(warning in r for r in records), records
        records.clear()
        loaded = safety.load_model(path, compile=True)
        assert not any(warning in r for r in records), records
    finally:
        done()
    assert isinstance(loaded.optimizer, keras.optimizers.Adam) and len(loaded.loss) == 2
    assert logging.getLogger("tensorflow").filters == filters_before  # the filter is local to the load


def test_saving_an_uncompiled_model_as_h5_does_not_show_the_compiled_metrics_warning(tmp_path, monkeypatch):
    warning = "Compiled the loaded model, but the compiled metrics"
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    records, done = _tensorflow_records(monkeypatch)
    try:
        model.save(str(tmp_path / "direct.h5"))  # tf_keras logs it on saving any uncompiled model
        assert any(warning in r for r in records), records
        records.clear()
        kio.save_model(model, tmp_path / "ours.h5")
        assert not any(warning in r for r in records), records
    finally:
        done()
    assert safety.load_model(str(tmp_path / "ours.h5")).count_params() == model.count_params()


# ---------------------------------------------------------------------------- 5. concurrent and hostile writes
def test_concurrent_writers_without_overwrite_one_wins_the_others_are_refused(tmp_path):
    target = tmp_path / "out.tflite"
    results = []
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            kio.write_bytes(target, b"x" * 100000 + bytes([i]))
            results.append(("ok", i))
        except OutputExistsError:
            results.append(("refused", i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for kind, i in results if kind == "ok"]
    assert len(winners) == 1 and len(results) == 8
    assert target.read_bytes() == b"x" * 100000 + bytes([winners[0]])
    assert os.listdir(tmp_path) == ["out.tflite"]


WORKER = textwrap.dedent("""
    import os, sys, time
    sys.argv = ["keras-rebuild"]
    from keras_rebuild import cli
    model, out, sync, me, trials = sys.argv[1:] if False else os.environ["KR_ARGS"].split("|")
    for trial in range(int(trials)):
        while not os.path.exists(os.path.join(sync, f"go{trial}")):
            time.sleep(0.005)
        cli.main(["prune", model, "--sparsity", "0.5", "-o", out, "--force"])
        open(os.path.join(sync, f"done{trial}_{me}"), "w").close()
""")


@pytest.mark.slow
def test_four_concurrent_prune_force_runs_leave_a_loadable_model_in_each_of_ten_trials(tmp_path):
    model_path = str(tmp_path / "m.keras")
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    keras.Model(inp, keras.layers.Dense(2, name="d")(keras.layers.Flatten()(x))).save(model_path)
    out, sync = str(tmp_path / "small.keras"), tmp_path / "sync"
    sync.mkdir()
    trials, workers = 10, 4
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE,
                              env=dict(env, KR_ARGS="|".join([model_path, out, str(sync), str(w), str(trials)])))
             for w in range(workers)]
    try:
        for trial in range(trials):
            (sync / f"go{trial}").touch()
            deadline = time.time() + 120
            while not all((sync / f"done{trial}_{w}").exists() for w in range(workers)):
                assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
                assert time.time() < deadline
                time.sleep(0.01)
            small = keras.models.load_model(out)
            assert small.get_layer("c1").filters == 2
            leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
            assert not leftovers, leftovers
    finally:
        for p in procs:
            p.wait(timeout=60)


def test_symlink_at_the_output_is_refused_and_never_written_through(tmp_path, capsys):
    model_path = str(tmp_path / "m.keras")
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Dense(4)(inp))).save(model_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "small.keras"
    link.symlink_to(victim)
    # The old fixed temporary name, planted as a symlink too.
    (tmp_path / ".small.keras.tmp.keras").symlink_to(victim)
    assert cli.main(["prune", model_path, "--sparsity", "0.5", "-o", str(link)]) == 2
    assert "--force" in capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert cli.main(["prune", model_path, "--sparsity", "0.5", "-o", str(link), "--force"]) == 0
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and zipfile.is_zipfile(link)


def test_tflite_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = kio.write_bytes(tmp_path / "a.tflite", b"TFL3")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o027)
        path = kio.write_bytes(tmp_path / "b.tflite", b"TFL3")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("name", [".keras", ".h5"])
def test_output_named_only_by_its_suffix_is_refused(tmp_path, capsys, name):
    model_path = str(tmp_path / "m.keras")
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(model_path)
    out = tmp_path / "out" / name
    assert cli.main(["prune", model_path, "--sparsity", "0.5", "-o", str(out)]) == 2
    assert "-o" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_api_and_cli_both_create_missing_output_folders(tmp_path):
    from keras_rebuild.export import export_tflite

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.save(str(tmp_path / "m.keras"))
    export_tflite(model, tmp_path / "api" / "deep" / "m.tflite")
    assert (tmp_path / "api" / "deep" / "m.tflite").exists()
    assert cli.main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "cli" / "deep" / "m.tflite")]) == 0
    assert (tmp_path / "cli" / "deep" / "m.tflite").exists()


SIGTERM_CHILD = textwrap.dedent("""
    import os, sys, time
    from keras_rebuild import io as kio
    with kio.exit_on_signals():
        with kio.atomic_output(sys.argv[1]) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            print("writing", flush=True)
            time.sleep(60)
""")


def test_sigterm_while_writing_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out.tflite"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.stdout.readline().strip() == b"writing"
    assert any(n.startswith(".out.tflite.") for n in os.listdir(tmp_path))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_write_failures_are_one_line_and_leave_nothing_behind(tmp_path, capsys, monkeypatch, err):
    model_path = str(tmp_path / "m.keras")
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Dense(4)(inp))).save(model_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(kio.os, "fsync", failing_fsync)
    for argv in (["prune", model_path, "--sparsity", "0.5", "-o", str(out_dir / "s.keras")],
                 ["export", model_path, "-o", str(out_dir / "m.tflite")]):
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and os.strerror(err) in lines[0] and errno.errorcode[err] in lines[0], lines
        assert os.listdir(out_dir) == []


def test_prune_force_onto_an_existing_folder_is_one_line(tmp_path, capsys):
    model_path = str(tmp_path / "m.keras")
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(model_path)
    (tmp_path / "d.keras").mkdir()
    assert cli.main(["prune", model_path, "--sparsity", "0.5", "-o", str(tmp_path / "d.keras"), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder" in err[0]
    assert (tmp_path / "d.keras").is_dir()


def test_errors_are_our_exception_classes():
    assert issubclass(safety.UnsafeModelError, (KerasRebuildError, ValueError))
    assert issubclass(safety.ModelFileError, (KerasRebuildError, ValueError))
    assert issubclass(kio.OutputWriteError, (KerasRebuildError, ValueError))
