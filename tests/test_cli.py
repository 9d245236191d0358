import subprocess
import sys
from pathlib import Path

import pytest

from dskd.__main__ import COMMANDS, main
from dskd.config import RunConfig, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, help_) in COMMANDS.items():
        assert name in out and help_ in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_help(name):
    r = subprocess.run(
        [sys.executable, "-m", "dskd", *name.split(), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and len(r.stdout.splitlines()) >= 3


def test_unknown_command_suggests(capsys):
    assert main(["asets"]) == 2
    assert "assets" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path):
    assert isinstance(load_yaml(path), RunConfig)


def test_config_errors_name_the_flag(tmp_path):
    from dskd.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="--loss.kappa"):
        from_dict({"loss": {"kappa": 0}})
    with pytest.raises(ConfigError, match="--loss.kapa: unknown option"):
        from_dict({"loss": {"kapa": 3}})
    with pytest.raises(ConfigError, match="--model.trainable_layers"):
        from_dict({"model": {"student_layers": 2, "trainable_layers": 3}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"--distill.lr.*bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_assets_twice_is_quick(tmp_path, monkeypatch):
    """Second run of `dskd assets` finds everything in place (the first may export the model)."""
    import time

    r = subprocess.run([sys.executable, "-m", "dskd", "assets"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "dskd", "assets"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "prepared" not in r.stdout, r.stdout
    assert time.time() - t < 5


def test_missing_debian_file_gives_install_command(monkeypatch, tmp_path):
    from dskd import assets

    monkeypatch.setenv("DSKD_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "WORDNET_DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(assets, "MYTHES_DAT", tmp_path / "none.dat")
    with pytest.raises(assets.AssetError, match="apt-get install -y wordnet-base"):
        assets.prepare_wordnet()
    with pytest.raises(assets.AssetError, match="apt-get install -y mythes-en-us"):
        assets.mythes_file()


def test_missing_package_gives_pip_command():
    from dskd.assets import AssetError, package_dir

    with pytest.raises(AssetError, match="pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg_module", "no-such-pkg")


def test_no_stage_module_imports_the_cli():
    for path in (ROOT / "dskd").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py") and path.parent.name == "dskd":
            continue
        text = path.read_text()
        assert "from dskd.cli" not in text and "import dskd.cli" not in text, path


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_a_typed_function_taking_config(name):
    """The parser of every command comes from its function: --config and the field docs' help."""
    import importlib

    from dskd.cli import build_parser

    module, func = COMMANDS[name][0].split(":")
    fn = getattr(importlib.import_module(module), func)
    help_text = build_parser(name, fn).format_help()
    assert "--config CONFIG" in help_text
    if name == "senses build":  # a field doc of SenseConfig is the flag's help
        assert "--senses.k K" in help_text and "Senses (k-means centroids) per token." in help_text
        assert "--senses.max_samples" in help_text and "Per-token reservoir sample cap." in help_text


def test_a_recipe_drives_a_section_command_and_flags_win(tmp_path):
    """`senses build --config RECIPE` reads the recipe's model and senses sections (and ignores the rest);
    dotted flags win over the file; a comma list is a list; a bare bool flag is true."""
    from dskd.cli import parse_command
    from dskd.senses import senses_build_command

    recipe = ROOT / "configs" / "smollm2-135m_to_15l.yaml"
    cfg = load_yaml(recipe)
    kw = parse_command("senses build", senses_build_command, ["--config", str(recipe), "--out", str(tmp_path)])
    assert kw["senses"] == cfg.senses and kw["model"] == cfg.model and kw["force"] is False
    argv = ["--config", str(recipe), "--senses.k", "7", "--senses.corpus", "a.txt,b.txt", "--force", "--out", "o"]
    kw = parse_command("senses build", senses_build_command, argv)
    assert kw["senses"].k == 7 and kw["senses"].corpus == ["a.txt", "b.txt"] and kw["force"] is True
    assert kw["senses"].max_tokens == cfg.senses.max_tokens


# Config errors of every command (a flag out of bounds, an old spelling, a recipe's bad value or unknown
# key), one line naming the flag and the file: tests/test_bad_inputs.py.


def test_data_and_report_do_not_import_the_scorer():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, dskd.report, dskd.data, dskd.plan; print('dskd.evaluate' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_config_diff_names_the_dotted_fields():
    from dskd.config import config_diff, to_dict

    a = to_dict(RunConfig())
    b = to_dict(RunConfig(out="elsewhere"))
    assert config_diff(a, b) == []
    b["loss"]["lam"], b["name"], b["senses"]["k"] = 0.0, "other", 9
    assert config_diff(a, b) == ["loss.lam", "name", "senses.k"]
    del b["fidelity"]  # a config saved before a section existed differs in every field of it
    assert "fidelity.text_limit" in config_diff(a, b)
