"""The README's code runs as written (so the first screen a user reads never rots).

The Quickstart (Keras 3) runs in every Keras 3 process, on its backend; the
"tf_keras and tfmot" section runs in the tf_keras process.
"""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _block_after(heading):
    """The first ``python`` code block of the section whose heading line is exactly ``heading``."""
    text = open(README, encoding="utf-8").read()
    section = re.split(rf"^{re.escape(heading)}\n", text, maxsplit=1, flags=re.M)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _accuracy(label, out):
    return float(re.search(rf"{label}:\s+([\d.]+)%", out).group(1))


def test_readme_shows_the_two_setup_commands_that_ci_runs():
    text = open(README, encoding="utf-8").read()
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run"), encoding="utf-8").read()
    test_cmd = 'python -m pip install -e ".[test]" && python -m tests'
    assert test_cmd in text and test_cmd in ci
    assert 'python -m pip install ".[demo]" && keras-rebuild demo' in text


def test_readme_leads_with_the_keras3_quickstart_and_keeps_the_tf_keras_section():
    text = open(README, encoding="utf-8").read()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings.index("Quickstart") < headings.index("tf_keras and tfmot")
    quick = _block_after("## Quickstart")
    assert re.search(r"^import keras\b", quick, re.M)
    assert 'flavour="keras3"' in quick and "tf_keras" not in quick
    assert "kr.digits_cnn()" in _block_after("## tf_keras and tfmot")  # the tf_keras builder


@pytest.mark.keras3_only
def test_readme_quickstart_runs_on_this_keras3_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _block_after("## Quickstart")
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    before, pruned, recovered = (_accuracy(k, out) for k in ("before pruning", "after pruning", "after recovery"))
    assert before > 85.0 and recovered > 85.0 and recovered >= pruned
    assert "total" in out and "median" in out  # the rebuild report and the benchmark
    assert namespace["model"].__class__.__module__.split(".")[0] == "keras"
    assert (tmp_path / "small.tflite").stat().st_size > 0
    assert namespace["result"].verification is not None
    assert (tmp_path / "plan.json").exists()
    assert namespace["small"].count_params() < 0.6 * namespace["model"].count_params()


@pytest.mark.tf_keras_only
def test_readme_tf_keras_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _block_after("## tf_keras and tfmot")
    namespace = {}
    exec(compile(code, "README tf_keras section", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "total" in out and "median" in out
    assert _accuracy("after recovery", out) > 85.0
    assert (tmp_path / "small_int8.tflite").stat().st_size > 0
    assert namespace["small"].count_params() < 0.6 * namespace["model"].count_params()
