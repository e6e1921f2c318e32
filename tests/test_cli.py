"""The command list and the functions behind it stay in sync; every --help is complete."""

from __future__ import annotations

import importlib
import inspect
import json

import click
import pytest
from click.testing import CliRunner

from vlsi_cli import COMMANDS, main


def _leaves(group, prefix=""):
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, path + " ")
        else:
            yield path, cmd


def test_commands_table_matches_the_click_tree():
    leaves = dict(_leaves(main))
    assert set(leaves) == set(COMMANDS)
    for path, target in COMMANDS.items():
        mod, fn = target.split(":")
        func = getattr(importlib.import_module(mod), fn)
        assert callable(func) and inspect.getdoc(func), path


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_is_complete(path):
    res = CliRunner().invoke(main, path.split() + ["--help"])
    assert res.exit_code == 0, res.output
    cmd = dict(_leaves(main))[path]
    assert cmd.help
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name != "help":
            assert p.help, f"{path} --{p.name} has no help"


def test_synth_tiny_eval_end_to_end(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["data", "synth", "--out", str(tmp_path / "d"), "--n", "30", "--n-eval", "8"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["tiny", "--out", str(tmp_path / "m"), "--verbalizers", "2::2"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d" / "test.json"),
                          "--verbalize", "--out", str(tmp_path / "r.json"), "--limit", "4"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n"] == 4 and set(rep["per_layer_accuracy"]) == {"2", "4", "6"}


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d.json").write_text("[]")
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.json")])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "config.json" in res.output
