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
