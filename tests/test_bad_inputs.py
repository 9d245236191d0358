"""Bad inputs: one case per kind of damage and per command that reads it.

Every artefact kind (recipe, lexicon, sense store, teacher cache, student folder, corpus, pairs file,
result JSON) missing, empty, truncated, of the wrong format or the wrong type; outputs that cannot be
written or are of the wrong kind; unknown and stale options. Each case runs the CLI in-process
(``dskd.__main__.main``, what ``python -m dskd`` calls) and asserts what a user sees: exit status 2, one
line on stderr without a traceback naming the path or the flag (so no progress bar of long work ran
first: bars go to stderr), and nothing written or changed at the output. The artefacts are built tiny once (``tiny_artefacts`` in conftest.py); a case
copies what it damages.

Also here: every config field given a wrong-typed value through a YAML recipe and through its flag
(the cases are generated from the dataclasses, so a new field is covered without a new test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from dskd.__main__ import main
from dskd.config import RunConfig, field_types

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- the runner


def _state(path: Path) -> Any:
    """What is at ``path`` (file bytes' hash, a folder's files and their hashes, or None), and any
    temporary sibling a write would leave (``.NAME...``)."""

    def one(p: Path) -> Any:
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_dir():
            return {str(q.relative_to(p)): one(q) for q in sorted(p.rglob("*")) if q.is_file()}
        return None

    parent = path.parent
    siblings = sorted(q.name for q in parent.glob(f".{path.name}*")) if parent.is_dir() else []
    return one(path), siblings


def refused(argv: list[str], must: list[Any], outputs: list[Path], capsys) -> str:
    """Run ``dskd ARGV`` in-process and check the refusal; returns the error line."""
    before = [_state(Path(o)) for o in outputs]
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("dskd "), line
    for m in must:
        assert str(m) in line, (m, line)
    assert [_state(Path(o)) for o in outputs] == before, "the output was written or changed"
    return line


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garbage(path: Path, n: int = 4000) -> Path:
    path.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(n)))  # not text, the same every run
    return path


# ------------------------------------------------------------------------------------------- the cases
# A case: (artefacts, tmp) -> (argv, what the error line must name, outputs that must stay as they were).
Case = Callable[[dict[str, Path], Path], tuple[list[Any], list[Any], list[Path]]]
CASES: dict[str, Case] = {}


def case(name: str):
    def add(fn: Case) -> Case:
        assert name not in CASES
        CASES[name] = fn
        return fn

    return add


# ---- recipe, read by every command with --config: a whole-recipe command, a section command, eval
RECIPE_COMMANDS = {
    "plan": lambda a, t: (["plan"], []),
    "senses-build": lambda a, t: (["senses", "build", "--out", t / "store"], [t / "store"]),
    "eval": lambda a, t: (
        ["eval", "--model", a["run"], "--eval.tasks", "arc_easy", "--eval.limit", "2", "--out", t / "r.json"],
        [t / "r.json"],
    ),
}
RECIPE_DAMAGE: dict[str, Callable[[dict[str, Path], Path], tuple[Path, list[Any]]]] = {
    "missing": lambda a, t: (t / "none.yaml", ["--config", "not found"]),
    "empty": lambda a, t: ((t / "r.yaml").touch() or t / "r.yaml", ["--config", "empty"]),
    "truncated": lambda a, t: (
        _write(t / "r.yaml", (lambda s: s[: s.index("max_tokens") + 3])(a["recipe"].read_text())),
        ["--config", "not valid YAML"],
    ),
    "not-text": lambda a, t: (_garbage(t / "r.yaml"), ["--config"]),
    "not-a-mapping": lambda a, t: (_write(t / "r.yaml", "- model\n- senses\n"), ["--config", "mapping"]),
    "a-folder": lambda a, t: (t, ["--config", "folder"]),
    "section-wrong-type": lambda a, t: (_write(t / "r.yaml", "senses: [1, 2]\n"), ["--senses:", "mapping"]),
    "field-wrong-type": lambda a, t: (_write(t / "r.yaml", "distill:\n  lr: abc\n"), ["--distill.lr", "float"]),
    "field-out-of-bounds": lambda a, t: (_write(t / "r.yaml", "senses:\n  k: 0\n"), ["--senses.k", ">= 1"]),
    "eval-field-out-of-bounds": lambda a, t: (
        _write(t / "r.yaml", "eval:\n  batch_size: 0\n"),
        ["--eval.batch_size", ">= 1"],
    ),
    "unknown-option": lambda a, t: (_write(t / "r.yaml", "senses:\n  kk: 3\n"), ["--senses.kk", "unknown option"]),
    "unknown-section": lambda a, t: (_write(t / "r.yaml", "sense:\n  k: 3\n"), ["--sense", "unknown option"]),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


for _cmd, _argv in RECIPE_COMMANDS.items():
    for _damage, _make in RECIPE_DAMAGE.items():

        def _recipe_case(a, t, _argv=_argv, _make=_make):
            recipe, must = _make(a, t)
            argv, outs = _argv(a, t)
            return [*argv, "--config", recipe], [*must, recipe], outs

        case(f"recipe-{_damage}-{_cmd}")(_recipe_case)


# ---- lexicon folder: lexicon show, senses build --lexicon_dir (before the teacher loads)
def _lexicon_damage(a: dict[str, Path], t: Path, how: str) -> tuple[Path, Path]:
    """A damaged copy of the lexicon and the file the error must name."""
    lex = t / "lex"
    if how == "missing":
        return lex, lex
    if how == "empty":
        lex.mkdir()
        return lex, lex
    if how == "a-file":
        lex.write_text("hot cold\n")
        return lex, lex
    _copy(a["lexicon"], lex)
    if how == "truncated":
        _truncate(lex / "relations.json")
        return lex, lex / "relations.json"
    if how == "meta-truncated":
        _truncate(lex / "meta.json")
        return lex, lex / "meta.json"
    if how == "other-format":  # a sense store where a lexicon goes
        shutil.rmtree(lex)
        _copy(a["store"], lex)
        return lex, lex / "meta.json"
    if how == "meta-wrong-type":
        (lex / "meta.json").write_text("[1, 2, 3]")
        return lex, lex / "meta.json"
    raise AssertionError(how)


LEXICON_DAMAGE = ("missing", "empty", "a-file", "truncated", "meta-truncated", "other-format", "meta-wrong-type")
for _how in LEXICON_DAMAGE:

    def _lex_show(a, t, _how=_how):
        lex, named = _lexicon_damage(a, t, _how)
        return ["lexicon", "show", lex, "hot"], [named, "dskd lexicon build"], [lex]

    def _lex_senses(a, t, _how=_how):
        lex, named = _lexicon_damage(a, t, _how)
        out = t / "store"
        argv = ["senses", "build", "--config", a["recipe"], "--lexicon_dir", lex, "--out", out]
        return argv, ["--lexicon_dir", named], [out, lex]

    case(f"lexicon-{_how}-lexicon-show")(_lex_show)
    case(f"lexicon-{_how}-senses-build")(_lex_senses)


# ---- sense store: senses show, plot senses --store, distill --distill.senses_dir (sense loss)
def _store_damage(a: dict[str, Path], t: Path, how: str) -> tuple[Path, Path]:
    store = t / "store"
    if how == "missing":
        return store, store
    if how == "empty":
        store.mkdir()
        return store, store
    if how == "a-file":
        _garbage(store)
        return store, store
    _copy(a["store"], store)
    if how == "truncated":
        f = next(store.glob("*.safetensors"))
        _truncate(f)
        return store, f
    if how == "empty-file":
        f = next(store.glob("*.safetensors"))
        f.write_bytes(b"")
        return store, f
    if how == "meta-truncated":
        _truncate(store / "meta.json")
        return store, store / "meta.json"
    if how == "other-format":  # a lexicon where a sense store goes
        shutil.rmtree(store)
        _copy(a["lexicon"], store)
        return store, store / "meta.json"
    raise AssertionError(how)


STORE_DAMAGE = ("missing", "empty", "a-file", "truncated", "empty-file", "meta-truncated", "other-format")
for _how in STORE_DAMAGE:

    def _store_show(a, t, _how=_how):
        store, named = _store_damage(a, t, _how)
        return ["senses", "show", store, "red"], [named, "dskd senses build"], [store]

    def _store_plot(a, t, _how=_how):
        store, named = _store_damage(a, t, _how)
        out = t / "fig.png"
        return ["plot", "senses", "--store", store, "--out", out], ["--store", named], [out, store]

    def _store_distill(a, t, _how=_how):
        store, named = _store_damage(a, t, _how)
        out = t / "run"
        argv = ["distill", "--config", a["recipe"], "--loss.lam", "1", "--out", out]
        argv += ["--distill.lexicon_dir", a["lexicon"], "--distill.senses_dir", store]
        return argv, ["--distill.senses_dir", named], [out, store]

    case(f"store-{_how}-senses-show")(_store_show)
    case(f"store-{_how}-plot-senses")(_store_plot)
    case(f"store-{_how}-distill")(_store_distill)


# ---- teacher cache: distill and cache build reuse an existing one (a missing or empty folder is built)
def _cache_damage(a: dict[str, Path], t: Path, how: str) -> tuple[Path, Path]:
    import json

    cache = t / "cache"
    if how == "a-file":
        cache.write_text("x")
        return cache, cache
    _copy(a["cache"], cache)
    shard = cache / json.loads((cache / "meta.json").read_text())["shards"][0]
    if how == "truncated":
        _truncate(shard)
        return cache, shard
    if how == "empty-file":
        shard.write_bytes(b"")
        return cache, shard
    if how == "meta-truncated":
        _truncate(cache / "meta.json")
        return cache, cache / "meta.json"
    if how == "other-format":
        shutil.rmtree(cache)
        _copy(a["lexicon"], cache)
        return cache, cache
    raise AssertionError(how)


for _how in ("a-file", "truncated", "empty-file", "meta-truncated", "other-format"):

    def _cache_distill(a, t, _how=_how):
        cache, named = _cache_damage(a, t, _how)
        out = t / "run"
        argv = ["distill", "--config", a["recipe"], "--distill.cache_dir", cache, "--out", out]
        return argv, ["--distill.cache_dir", named], [out, cache]

    def _cache_build(a, t, _how=_how):
        cache, named = _cache_damage(a, t, _how)
        argv = ["cache", "build", "--config", a["recipe"], "--distill.cache_dir", cache, "--out", t / "run"]
        return argv, ["--distill.cache_dir", named], [cache]

    case(f"cache-{_how}-distill")(_cache_distill)
    case(f"cache-{_how}-cache-build")(_cache_build)


# ---- student folder: eval --model, fidelity --students
def _student_damage(a: dict[str, Path], t: Path, how: str) -> tuple[Path, Path]:
    run = t / "run"
    if how == "missing":
        return run, run
    if how == "empty":
        run.mkdir()
        return run, run
    if how == "a-file":
        _garbage(run)
        return run, run
    _copy(a["run"], run)
    weights = run / "student" / "model.safetensors"
    if how == "truncated":
        _truncate(weights, 0.9)
        return run, weights
    if how == "empty-file":
        weights.write_bytes(b"")
        return run, weights
    if how == "config-truncated":
        _truncate(run / "student" / "config.json")
        return run, run / "student" / "config.json"
    if how == "other-format":  # a lexicon folder given as a model
        shutil.rmtree(run)
        _copy(a["lexicon"], run)
        return run, run
    raise AssertionError(how)


for _how in ("missing", "empty", "a-file", "truncated", "empty-file", "config-truncated", "other-format"):

    def _student_eval(a, t, _how=_how):
        run, named = _student_damage(a, t, _how)
        out = t / "r.json"
        return ["eval", "--config", a["recipe"], "--model", run, "--out", out], [named], [out, run]

    def _student_fidelity(a, t, _how=_how):
        run, named = _student_damage(a, t, _how)
        out = t / "f.json"
        argv = ["fidelity", "--config", a["recipe"], "--students", run, "--out", out]
        argv += ["--fidelity.text_limit", "2", "--fidelity.prompt_limit", "1", "--fidelity.probe", "false"]
        return argv, [named], [out, run]

    case(f"student-{_how}-eval")(_student_eval)
    case(f"student-{_how}-fidelity")(_student_fidelity)


# ---- corpus: senses build --senses.corpus, cache build --data.text_files, plot senses --corpus
def _corpus_damage(a: dict[str, Path], t: Path, how: str) -> tuple[Path, list[Any]]:
    if how == "missing":
        return t / "none.txt", [t / "none.txt"]
    if how == "empty":
        return _write(t / "c.txt", ""), [t / "c.txt", "empty"]
    if how == "truncated-jsonl":
        return _write(t / "c.jsonl", '{"text": "the red car"}\n{"text": "the bl'), [f"{t / 'c.jsonl'}:2"]
    if how == "not-text":
        return _garbage(t / "c.txt", 20_000), [t / "c.txt", "% of", "not UTF-8 text"]
    if how == "wrong-type-jsonl":
        return _write(t / "c.jsonl", "[1, 2]\n"), [f"{t / 'c.jsonl'}:1"]
    if how == "folder-without-text":
        (t / "c").mkdir()
        (t / "c" / "x.bin").write_bytes(b"\0")
        return t / "c", [t / "c"]
    raise AssertionError(how)


for _how in ("missing", "empty", "truncated-jsonl", "not-text", "wrong-type-jsonl", "folder-without-text"):

    def _corpus_senses(a, t, _how=_how):
        corpus, must = _corpus_damage(a, t, _how)
        out = t / "store"
        return (
            ["senses", "build", "--config", a["recipe"], "--senses.corpus", corpus, "--out", out],
            [
                "--senses.corpus",
                *must,
            ],
            [out],
        )

    def _corpus_plot(a, t, _how=_how):
        corpus, must = _corpus_damage(a, t, _how)
        out = t / "fig.png"
        argv = ["plot", "senses", "--teacher", a["teacher"], "--corpus", corpus, "--out", out]
        return argv, ["--corpus", *must], [out]

    case(f"corpus-{_how}-senses-build")(_corpus_senses)
    case(f"corpus-{_how}-plot-senses")(_corpus_plot)

for _how in ("missing", "truncated-jsonl", "not-text", "wrong-type-jsonl"):

    def _corpus_cache(a, t, _how=_how):
        corpus, must = _corpus_damage(a, t, _how)
        cache = t / "cache"
        argv = ["cache", "build", "--config", a["recipe"], "--data.text_files", corpus]
        argv += ["--distill.cache_dir", cache]
        return argv, ["--data.text_files", *must], [cache]

    case(f"corpus-{_how}-cache-build")(_corpus_cache)


def _no_heads_corpus(a, t):
    """A text corpus none of whose words is a head of the lexicon (hot, cold, good, ...): the store
    would cover none of them, so it is refused, not written."""
    corpus = _write(t / "c.txt", "The red car and the blue bus. Prices rise and fall. " * 200)
    out = t / "store"
    argv = ["senses", "build", "--config", a["recipe"], "--senses.corpus", corpus, "--lexicon_dir", a["lexicon"]]
    return [*argv, "--out", out], ["--senses.corpus", corpus, "only 0 of the lexicon's 8 heads", "not written"], [out]


case("corpus-no-lexicon-heads-senses-build")(_no_heads_corpus)


# ---- pairs file: lexicon build --lexicon.sources pairs:FILE:ant
def _pairs_case(how: str) -> Case:
    def make(a, t):
        f = t / "ant.txt"
        must: list[Any] = ["--lexicon.sources", f]
        if how == "missing":
            must.append("not found")
        elif how == "empty":
            f.write_text("")
            must.append("no word pairs")
        elif how == "truncated":
            f.write_text("hot cold\ngood")
            must.append("malformed")
        elif how == "not-text":
            _garbage(f)
            must.append("malformed")
        elif how == "no-token":  # words none of which is one token of the toy tokenizer
            f.write_text("zyzzyva xylyl\nqwertz jkjkjk\n")
            must.append("none of its 4 words is a single token")
        out = t / "lex"
        return (
            ["lexicon", "build", "--config", a["recipe"], "--lexicon.sources", f"pairs:{f}:ant", "--out", out],
            (must),
            [out],
        )

    return make


for _how in ("missing", "empty", "truncated", "not-text", "no-token"):
    case(f"pairs-{_how}-lexicon-build")(_pairs_case(_how))


# ---- result JSON: report
def _result_case(how: str) -> Case:
    def make(a, t):
        res = t / "res.json"
        if how == "empty":
            res.write_text("")
        elif how == "truncated":
            res.write_text(a["result"].read_text()[:100])
        elif how == "not-text":
            _garbage(res)
        elif how == "other-format":
            shutil.copy(a["lexicon"] / "meta.json", res)
        elif how == "wrong-type":
            res.write_text("[1, 2]")
        elif how == "a-folder":
            res.mkdir()
        out = t / "table.md"
        return ["report", res, "--out", out], [res, "dskd eval"], [out, res]

    return make


for _how in ("missing", "empty", "truncated", "not-text", "other-format", "wrong-type", "a-folder"):
    case(f"result-{_how}-report")(_result_case(_how))


# ---- outputs: a parent that is a file (cannot be created), a file where a folder goes and the reverse,
# an existing target of another kind (never replaced)
def _blocker(t: Path) -> Path:
    f = t / "blocker"
    f.write_text("a file, not a folder\n")
    return f


OUTPUT_COMMANDS: dict[str, tuple[Callable[[dict[str, Path], Path], list[Any]], bool, str]] = {
    # name: (argv without the output, output is a folder, the flag naming it)
    "lexicon-build": (lambda a, o: ["lexicon", "build", "--config", a["recipe"], "--out", o], True, "--out"),
    "senses-build": (lambda a, o: ["senses", "build", "--config", a["recipe"], "--out", o], True, "--out"),
    "distill": (lambda a, o: ["distill", "--config", a["recipe"], "--out", o], True, "--out"),
    "run": (lambda a, o: ["run", "--config", a["recipe"], "--out", o], True, "--out"),
    "cache-build": (
        lambda a, o: ["cache", "build", "--config", a["recipe"], "--distill.cache_dir", o],
        True,
        "--distill.cache_dir",
    ),
    "eval": (lambda a, o: ["eval", "--config", a["recipe"], "--model", a["run"], "--out", o], False, "--out"),
    "fidelity": (
        lambda a, o: ["fidelity", "--config", a["recipe"], "--students", a["run"], "--out", o],
        False,
        "--out",
    ),
    "report": (lambda a, o: ["report", a["result"], "--out", o], False, "--out"),
    "plot-senses": (lambda a, o: ["plot", "senses", "--teacher", a["teacher"], "--out", o], False, "--out"),
}
_SUFFIX = {"eval": ".json", "fidelity": ".json", "report": ".md", "plot-senses": ".png"}


for _cmd, (_argv, _folder, _flag) in OUTPUT_COMMANDS.items():
    sfx = _SUFFIX.get(_cmd, "")

    def _unwritable(a, t, _argv=_argv, _flag=_flag, sfx=sfx):
        out = _blocker(t) / f"out{sfx}"
        return _argv(a, out), [_flag, out, "cannot be created"], [out.parent]

    def _wrong_type(a, t, _argv=_argv, _flag=_flag, _folder=_folder, sfx=sfx):
        out = t / f"out{sfx}"
        if _folder:
            out.write_text("a file\n")
            must = "is a file"
        else:
            out.mkdir()
            (out / "keep.txt").write_text("mine\n")
            must = "is a folder"
        return _argv(a, out), [_flag, out, must], [out]

    def _foreign(a, t, _argv=_argv, _flag=_flag, _folder=_folder, sfx=sfx):
        out = t / f"out{sfx}"
        if _folder:
            out.mkdir()
            (out / "thesis.tex").write_text("years of work\n")
        elif sfx == ".json":
            _copy(a["lexicon"] / "meta.json", out)  # another artefact's JSON
        elif sfx == ".md":
            _copy(a["result"], out)  # `dskd report ... --out results/kd.json` by mistake: never overwritten
        else:
            out.write_text("not a figure\n")
            return _argv(a, out.with_suffix(".txt")), [_flag, out.with_suffix(".txt"), "figure"], [out]
        return _argv(a, out), [_flag, out, "refusing to replace it"], [out]

    case(f"output-unwritable-{_cmd}")(_unwritable)
    case(f"output-wrong-type-{_cmd}")(_wrong_type)
    case(f"output-foreign-{_cmd}")(_foreign)


# ---- options: unknown, stale (an older spelling), a bad value of a bare bool flag
OPTION_CASES: dict[str, tuple[Callable[[Path], list[Any]], list[str]]] = {
    "unknown": (lambda o: ["senses", "build", "--senses.kk", "3", "--out", o], ["--senses.kk", "unknown option"]),
    "out-of-bounds": (lambda o: ["senses", "build", "--senses.k", "0", "--out", o], ["--senses.k: must be >= 1"]),
    "stale-k": (lambda o: ["senses", "build", "--k", "3", "--out", o], ["--k", "did you mean --senses.k"]),
    "stale-corpus": (
        lambda o: ["senses", "build", "--corpus", "x.txt", "--out", o],
        ["--corpus", "did you mean --senses.corpus"],
    ),
    "stale-section": (lambda o: ["distill", "--train.lr", "1", "--out", o], ["--train.lr", "unknown option"]),
    "bad-bool": (
        lambda o: ["distill", "--distill.grad_checkpointing", "maybe", "--out", o],
        ["--distill.grad_checkpointing", "maybe"],
    ),
    "missing-value": (lambda o: ["eval", "--out", o, "--model"], ["--model", "expects a value"]),
    "missing-out": (lambda o: ["eval", "--eval.limit", "1"], ["--out: required"]),
    "extra-argument": (lambda o: ["senses", "show", "a", "b", "c"], ["'c'"]),
}
for _name, (_argv, _must) in OPTION_CASES.items():

    def _opt(a, t, _argv=_argv, _must=_must):
        return _argv(t / "out"), _must, [t / "out"]

    case(f"option-{_name}")(_opt)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_naming_it(name, tiny_artefacts, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here, and is checked absent
    argv, must, outputs = CASES[name](tiny_artefacts, tmp_path)
    refused(argv, must, [*outputs, tmp_path / "runs"], capsys)


def test_the_suite_covers_every_artefact_kind_and_command():
    kinds = {n.split("-")[0] for n in CASES}
    assert kinds >= {"recipe", "lexicon", "store", "cache", "student", "corpus", "pairs", "result", "output", "option"}
    writers = {n.split("-", 2)[2] for n in CASES if n.startswith("output-unwritable-")}
    assert writers == set(OUTPUT_COMMANDS)


def test_the_user_sees_the_same_in_a_shell(tiny_artefacts, tmp_path):
    """The in-process runner sees what `python -m dskd` prints and returns."""
    bad = _write(tmp_path / "r.yaml", "distill:\n  lr: abc\n")
    r = subprocess.run(
        [sys.executable, "-m", "dskd", "plan", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"dskd plan: error: --distill.lr: expected a float, got 'abc' [in {bad}]"


# ------------------------------------------------------------------ typed recipes: every field, both ways


def _wrong(hint: Any) -> tuple[Any, str | None]:
    """A value of the wrong type for ``hint`` in a YAML recipe, and the same as flag text (None when a
    flag cannot be of the wrong type: on the command line any text is a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"no wrong value known for {hint}; extend _wrong"
        return _wrong(inner[0])
    if hint is bool:
        return "maybe", "maybe"
    if hint in (int, float):
        return "abc", "abc"
    if hint is str:
        return [1, 2], None
    if origin is Literal:
        return "no-such-choice", "no-such-choice"
    if origin is list:
        return {"a": 1}, "[[1]]"
    if origin is dict:
        return [1], "[1]"
    raise AssertionError(f"no wrong value known for {hint}; extend _wrong")


def _fields() -> list[tuple[str, Any]]:
    out = []
    for name, hint in field_types(RunConfig).items():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += [(f"{name}.{k}", h) for k, h in field_types(hint).items()]
        else:
            out.append((name, hint))
    return out


FIELDS = _fields()


@pytest.mark.parametrize("how", ["yaml", "flag"])
@pytest.mark.parametrize("flag,hint", FIELDS, ids=[f for f, _ in FIELDS])
def test_every_field_is_typed_in_a_recipe_and_as_a_flag(flag, hint, how, tmp_path, capsys):
    from dskd.config import describe_type

    value, text = _wrong(hint)
    if how == "flag" and text is None:
        pytest.skip("on the command line any text is a string")
    if how == "yaml":
        section, _, key = flag.partition(".")
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({section: {key: value}} if key else {section: value}))
        argv, expect = ["plan", "--config", str(recipe)], f"--{flag}: expected {describe_type(hint)}"
        line = refused(argv, [expect, f"[in {recipe}]"], [], capsys)
    else:
        line = refused(["plan", f"--{flag}", text], [f"--{flag}:"], [], capsys)
    assert repr(value if how == "yaml" else text) in line or "must be one of" in line, line


def test_a_store_covering_too_few_heads_is_refused_not_written(tiny_artefacts, tmp_path, monkeypatch):
    """After gathering (key predicted: what the teacher predicts is known only then), a store holding
    senses for under MIN_HEAD_SHARE of the lexicon's heads is refused and nothing is left at ``out``.
    The threshold is raised above 1 here so that this tiny store, whatever it covers, is under it."""
    import dskd.senses.build as B
    from dskd.config import SenseConfig
    from dskd.senses import SenseError, build_senses

    monkeypatch.setattr(B, "MIN_HEAD_SHARE", 1.01)
    cfg = SenseConfig(corpus=[str(tiny_artefacts["corpus"])], k=2, max_tokens=600, seq_len=64, key="predicted")
    out = tmp_path / "store"
    with pytest.raises(SenseError, match=r"the store would hold senses for \d+ of the lexicon's 8 heads.*not written"):
        build_senses(str(tiny_artefacts["teacher"]), cfg, tiny_artefacts["lexicon"], out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_type_check_knows_every_annotation_a_field_may_have():
    """Types no field has today (a Literal, a dict, a tuple) are checked too, so a field added with one
    is typed in recipes without new code; a float given as an int or as YAML's string ``3e-4`` is a float."""
    from dskd.config import ConfigError, check_value

    ok = [
        (3, float, 3.0),
        ("3e-4", float, 3e-4),
        ("fp32", Literal["fp32", "bf16"], "fp32"),
        (None, int | None, None),
        (["a", "b"], list[str], ["a", "b"]),
        ({"a": 1.0, "b": 2}, dict[str, float], {"a": 1.0, "b": 2.0}),
        ([1, "x"], tuple[int, str], (1, "x")),
        ("p", Path, Path("p")),
        (True, bool, True),
    ]
    for value, hint, want in ok:
        got = check_value(value, hint, "s.f")
        assert got == want and type(got) is type(want), (value, hint, got)
    bad = [
        ("abc", float, "--s.f: expected a float, got 'abc'"),
        (True, int, "--s.f: expected an integer, got True"),
        (1.5, int, "--s.f: expected an integer, got 1.5"),
        ("fp16", Literal["fp32", "bf16"], "--s.f: expected one of fp32, bf16, got 'fp16'"),
        ("x", int | None, "--s.f: expected an integer or null, got 'x'"),
        ("a,b", list[str], "--s.f: expected a list of strings, got 'a,b'"),
        ([1], list[str], "--s.f: expected a list of strings, got [1]"),
        ({"a": "x"}, dict[str, float], "--s.f: expected a mapping, got {'a': 'x'}"),
        ([1], tuple[int, str], "--s.f: expected a list of 2 values (an integer, a string), got [1]"),
        ("yes", bool, "--s.f: expected true or false, got 'yes'"),
        (5, str, "--s.f: expected a string, got 5"),
    ]
    for value, hint, msg in bad:
        with pytest.raises(ConfigError) as e:
            check_value(value, hint, "s.f")
        assert str(e.value) == msg and e.value.flag == "s.f"
