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


def test_synth_pool_split_from_the_command_line(tmp_path):
    """--n-pool writes the fresh pool split (none of its images in train) and leaves the rest as without it."""
    r = CliRunner()
    base = ["data", "synth", "--n", "30", "--n-eval", "8", "--no-mc"]
    assert r.invoke(main, [*base, "--out", str(tmp_path / "p"), "--n-pool", "12"]).exit_code == 0
    assert r.invoke(main, [*base, "--out", str(tmp_path / "q")]).exit_code == 0
    pool = json.loads((tmp_path / "p" / "pool.json").read_text())
    assert len(pool) == 12 and not (tmp_path / "q" / "pool.json").exists()
    assert (tmp_path / "p" / "train.json").read_bytes() == (tmp_path / "q" / "train.json").read_bytes()
    res = r.invoke(main, [*base, "--out", str(tmp_path / "bad"), "--n-pool", "-1"])
    assert res.exit_code == 2 and "n_pool" in res.output


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d.json").write_text("[]")
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.json")])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "config.json" in res.output


def _defaults(obj) -> dict:
    """Parameter defaults of a function, or field defaults of a dataclass."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


# where a command's options take their defaults from, besides the function it wraps
DEFAULT_SOURCES = {"data synth": ["vlsi.data.synth:SynthConfig"], "serve": ["vlsi_apps.server:Limits"]}
# options that take a name the function turns into another value (a colour name -> RGB)
CONVERTED = {("data synth", "background")}


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_cli_defaults_equal_the_function_defaults(path):
    """A default is defined once: every option named like a parameter (or config field) of what
    the command runs has that parameter's default (--n once said 2000 while SynthConfig said 1000)."""
    sources = [COMMANDS[path], *DEFAULT_SOURCES.get(path, [])]
    defaults = {}
    for src in sources:
        mod, name = src.split(":")
        defaults.update(_defaults(getattr(importlib.import_module(mod), name)))
    cmd = dict(_leaves(main))[path]
    checked = 0
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name not in defaults or (path, p.name) in CONVERTED:
            continue
        default = p.default if p.default in (True, False) or not p.is_flag else False  # a bare flag is off
        if default is not None:
            assert default == defaults[p.name], f"{path} --{p.name}: CLI {default!r} vs {defaults[p.name]!r}"
            checked += 1
    if path in ("data synth", "tiny", "serve", "bench"):
        assert checked >= 3, f"{path}: the option names no longer match the function's ({checked} compared)"


def test_export_flags_come_from_the_targets_options():
    import dataclasses

    from vlsi_export import get_target, targets

    cmd = dict(_leaves(main))["export"]
    flags = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for t in targets():
        for f in dataclasses.fields(get_target(t).Options):
            assert f.name in flags, f"--{f.name} of the {t} target is not a flag of vlsi export"
            assert flags[f.name].default is None  # unset flags take the target's own default
            if f.name not in ("verbalizers", "overwrite", "validate", "data", "parity_samples"):
                assert f"{t}: {f.default}" in flags[f.name].help, (t, f.name, flags[f.name].help)


def test_export_refuses_another_targets_flag(tmp_path):
    res = CliRunner().invoke(main, ["tiny", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "a"),
                                    "--target", "gguf", "--vision-quant", "fp16"])
    assert res.exit_code == 2 and "the gguf target has no option --vision-quant" in res.output, res.output
    assert not (tmp_path / "a").exists()


def test_a_missing_extra_is_one_line_naming_the_install(tmp_path):
    """On an edge install without onnx, `vlsi export` says which extra to install, no traceback."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, sys
import importlib.machinery
class Absent(importlib.abc.Loader):  # found by probes (as transformers does), fails when imported
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnx":
            return importlib.machinery.ModuleSpec(name, Absent())
sys.meta_path.insert(0, Refuse())
from vlsi_cli import main
main(["tiny", "--out", {str(tmp_path / "m")!r}], standalone_mode=False)
main(["export", "--model", {str(tmp_path / "m")!r}, "--out", {str(tmp_path / "a")!r}])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "error: this command needs onnx, which is not installed: pip install 'vlsi[onnx]'"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
