"""The README's quickstart runs as written (so the first screen a user reads never rots)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _block_after(heading):
    text = open(README, encoding="utf-8").read()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_shows_the_two_setup_commands_that_ci_runs():
    text = open(README, encoding="utf-8").read()
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run"), encoding="utf-8").read()
    test_cmd = 'python -m pip install -e ".[test]" && python -m tests'
    assert test_cmd in text and test_cmd in ci
    assert 'python -m pip install ".[demo]" && keras-rebuild demo' in text


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _block_after("## Quickstart")
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "total" in out and "median" in out
    assert (tmp_path / "small_int8.tflite").stat().st_size > 0
    assert namespace["small"].count_params() < 0.6 * namespace["model"].count_params()
