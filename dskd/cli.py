"""The ``dskd`` command: the one table from command name to the library function that runs it, and the
one way every command's parser is built.

Every command is a typed function in the module of its stage (``dskd.senses.cli:senses_build_command``
...). Its parser is built by jsonargparse from the function's signature and docstring:

- a parameter typed with a config dataclass (``senses: SenseConfig``) becomes the dotted flags of
  that section (``--senses.k 10``), with the help text of the dataclass's field docs;
- a parameter typed :class:`~dskd.config.RunConfig` (``run``, ``experiment``, ``distill``,
  ``cache build``, ``plan``) becomes the whole recipe's dotted flags, plus ``--device`` / ``--dtype``;
- every other parameter is a flag of its own (``--out``, ``--force``); a positional-only one (before
  ``/``) may also be given bare, in order (``dskd senses show STORE WORD``).

Every command takes ``--config FILE.yaml`` (a recipe, see ``configs/``): a command reads the sections
it declares and ignores the others, so one recipe drives every stage; flags win over the file. A bool
flag given bare means true (``--force`` = ``--force true``); ``-`` and ``_`` are the same in a flag
name (``--report-name`` = ``--report_name``); a list flag takes a comma-separated value
or a YAML list (``--eval.tasks arc_easy,piqa`` = ``--eval.tasks [arc_easy,piqa]``). Config errors name
the flag. Modules are imported only when their command runs, so ``dskd --help`` is instant. No stage
module imports this one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from dskd.config import ConfigError, DskdError, RunConfig

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "assets": (
        "dskd.assets:assets_command",
        "Prepare the offline defaults (SmolLM2 teacher, benchmarks, WordNet) under $DSKD_HOME.",
    ),
    "demo": ("dskd.demo:demo_command", "Show the teacher and a truncated student completing a prompt."),
    "lexicon build": (
        "dskd.lexicon:lexicon_build_command",
        "Build synonym/antonym relations for a teacher's tokenizer.",
    ),
    "lexicon show": ("dskd.lexicon:lexicon_show_command", "Print a word's synonyms and antonyms with their token ids."),
    "senses build": (
        "dskd.senses.cli:senses_build_command",
        "Gather teacher states, cluster senses per token, store them.",
    ),
    "senses show": (
        "dskd.senses.cli:senses_show_command",
        "Print a word's senses, samples per sense and nearest tokens.",
    ),
    "senses coverage": (
        "dskd.senses.cli:senses_coverage_command",
        "Training targets with clustered senses per store size, counted from tokens (no store built).",
    ),
    "plot senses": (
        "dskd.plots:plot_senses_command",
        "Draw the teacher's contextual states and senses of some words (Figure 1).",
    ),
    "cache build": (
        "dskd.data:cache_build_command",
        "Run the teacher once over a recipe's data and cache its outputs.",
    ),
    "distill": (
        "dskd.distill:distill_command",
        "Train a student with KD or DSKD (resumable) and export it as an HF folder.",
    ),
    "eval": (
        "dskd.evaluate:eval_command",
        "Evaluate a model on multiple-choice benchmarks (dskd eval --list_tasks for tasks).",
    ),
    "fidelity": (
        "dskd.fidelity:fidelity_command",
        "Held-out KL, agreement, perplexity and the sense probe of students against the teacher.",
    ),
    "report": (
        "dskd.report:report_command",
        "One table from result files, with paired bootstrap CIs against a baseline.",
    ),
    "plan": (
        "dskd.plan:plan_command",
        "Per stage: GPUs, parameters, memory, disk, tokens, steps, command (no weights read).",
    ),
    "run": (
        "dskd.pipeline:run_command",
        "The main job: lexicon, senses, cache, KD + DSKD students, evaluation, report.",
    ),
    "experiment": (
        "dskd.pipeline:experiment_command",
        "Paired KD / DSKD / hidden-MSE arms over seeds, with CIs.",
    ),
}

# A parameter of this name is not a flag: it receives the argv that set the recipe (``--config`` and the
# dotted flags), for commands that print commands to rerun (``dskd plan``).
RECIPE_ARGV = "recipe_argv"
_TRUE_FALSE = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


@dataclasses.dataclass
class _Signature:
    """What the parser of one command function holds."""

    recipe: str | None  # the parameter typed RunConfig
    sections: dict[str, type]  # parameter -> config dataclass (one section)
    wants_argv: bool
    positional: list[str]  # positional-only parameters: given in order without their flag


def _signature(fn: Callable[..., Any]) -> _Signature:
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    recipe, sections = None, {}
    for name in params:
        t = hints.get(name)
        if t is RunConfig:
            recipe = name
        elif _is_dataclass_type(t):
            sections[name] = t
    positional = [n for n, q in params.items() if q.kind is inspect.Parameter.POSITIONAL_ONLY]
    return _Signature(recipe, sections, RECIPE_ARGV in params, positional)


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\nArgs:", 1)[0].strip()


def build_parser(name: str, fn: Callable[..., Any]):
    """The jsonargparse parser of ``dskd NAME``, from ``fn``'s signature and the config dataclasses."""
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    sig = _signature(fn)
    p = ArgumentParser(
        prog=f"dskd {name}", description=_description(fn), exit_on_error=False, formatter_class=Formatter
    )
    p.add_argument("--config", action="append", default=None, help="A YAML recipe (see configs/); repeatable.")
    skip = {RECIPE_ARGV} | ({sig.recipe} if sig.recipe else set())
    if sig.recipe:
        p.add_class_arguments(RunConfig, nested_key=None, fail_untyped=False)
        p.add_argument(
            "--device",
            default=None,
            help="Where every model of this command runs: auto (the accelerator when there is one), cpu, cuda "
            "(sets model.device and eval.device).",
        )
        p.add_argument(
            "--dtype",
            default=None,
            choices=("auto", "float32", "bfloat16", "float16"),
            help="Weights dtype: auto (bfloat16 on a GPU, float32 on the CPU) (sets model.dtype and eval.dtype).",
        )
    p.add_function_arguments(fn, skip=skip, fail_untyped=False, as_group=False)
    return p


def _typehint(action: Any) -> Any:
    return getattr(action, "_typehint", None)


def _is_list(t: Any) -> bool:
    if typing.get_origin(t) is list:
        return True
    return any(typing.get_origin(a) is list for a in typing.get_args(t))


def _is_bool(t: Any) -> bool:
    return t is bool or (typing.get_origin(t) in (typing.Union, types.UnionType) and bool in typing.get_args(t))


def _normalise(p, name: str, argv: list[str], positional: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` with positional arguments given their flags (a list parameter last takes every remaining
    one: ``dskd report A.json B.json``), bare bool flags completed, comma lists made YAML lists, and
    ``--config`` taken out.

    Returns:
        (the rewritten argv without ``--config``, the config files in order).
    """
    options = p._option_string_actions  # noqa: SLF001  (argparse keeps no public table)
    out: list[str] = []
    configs: list[str] = []
    positionals: list[str] = []
    after_bool: dict[int, str] = {}  # a bare word right after a bare bool flag: the flag's bad value?
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-") or tok == "-":
            if i > 0 and argv[i - 1].startswith("--") and "=" not in argv[i - 1]:
                prev = options.get(argv[i - 1]) or options.get("--" + argv[i - 1][2:].replace("-", "_"))
                if prev is not None and _is_bool(_typehint(prev)):
                    after_bool[len(positionals)] = argv[i - 1]
            positionals.append(tok)
            i += 1
            continue
        key, eq, value = tok.partition("=")
        if key in ("-h", "--help"):
            out.append(tok)
            i += 1
            continue
        action = options.get(key)
        if action is None and key.startswith("--"):  # --report-name is --report_name
            key = "--" + key[2:].replace("-", "_")
            action = options.get(key)
        if action is None:
            raise ConfigError(_unknown_option(p, name, tok.partition("=")[0]))
        if eq:
            i += 1
        elif _is_bool(_typehint(action)) and (i + 1 >= len(argv) or argv[i + 1].lower() not in _TRUE_FALSE):
            value, i = "true", i + 1  # a bare bool flag means true
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{key}: expects a value (see dskd {name} --help)")
            value, i = argv[i + 1], i + 2
        if key == "--config":
            configs.append(value)
            continue
        if _is_list(_typehint(action)) and not key.endswith("+") and not value.lstrip().startswith("["):
            value = json.dumps([v for v in value.split(",") if v])
        out += [key, value]
    named: list[str] = []
    for k, param in enumerate(positional):
        if k >= len(positionals):
            break
        action = options[f"--{param}"]
        if k == len(positional) - 1 and _is_list(_typehint(action)):
            named += [f"--{param}", json.dumps(positionals[k:])]
            positionals = positionals[: k + 1]
        else:
            named += [f"--{param}", positionals[k]]
    if len(positionals) > len(positional):
        extra = next((k for k in sorted(after_bool) if k >= len(positional)), None)
        if extra is not None:
            flag = after_bool[extra]
            raise ConfigError(f"{flag}: expected true or false, got {positionals[extra]!r}", flag=flag[2:])
        raise ConfigError(f"unexpected argument {positionals[len(positional)]!r} (see dskd {name} --help)")
    return named + out, configs


def _unknown_option(p, name: str, key: str) -> str:
    known = [o for o in p._option_string_actions if o.startswith("--")]  # noqa: SLF001
    bare = key.lstrip("-").replace("-", "_")
    near = [o for o in known if o.rsplit(".", 1)[-1].lstrip("-") == bare and not o.endswith("+")]
    near = near or difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return f"{key}: unknown option{hint} (see dskd {name} --help)"


def _load_config_files(p, files: list[str], sig: _Signature) -> dict[str, str]:
    """Set the parser's defaults from the recipe files: the sections this command declares. Every value
    of every section is checked against its field's type first (as a flag is), a mismatch naming the
    field and the file.

    Returns:
        The dotted field -> the file that set it last (for errors found later, by the bounds checks).
    """
    from dskd.config import check_value, field_types, from_dict, load_yaml_dict

    top = field_types(RunConfig)
    origin: dict[str, str] = {}
    for f in files:
        data = load_yaml_dict(f)
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key not in top:
                raise ConfigError(f"--{key}: unknown option; valid: {', '.join(sorted(top))} [in {f}]")
            section = top[key]
            try:
                if _is_dataclass_type(section):
                    if value is None:
                        continue
                    if not isinstance(value, dict):
                        raise ConfigError(f"--{key}: expected a mapping of options, got {value!r}")
                    fields = field_types(section)
                    for k, v in value.items():
                        if k not in fields:
                            raise ConfigError(f"--{key}.{k}: unknown option; valid: {', '.join(sorted(fields))}")
                        v = check_value(v, fields[k], f"{key}.{k}")  # every section: one recipe, one check
                        if sig.recipe is not None or key in sig.sections:
                            flat[f"{key}.{k}"] = v
                    if sig.recipe is None and key not in sig.sections:  # a section this command ignores
                        from_dict(value, section, prefix=key)  # is still checked (bounds, choices)
                else:
                    value = check_value(value, section, key)
                    if sig.recipe is not None:
                        flat[key] = value
            except ConfigError as e:
                raise ConfigError(f"{e} [in {f}]") from e
        for k, v in flat.items():
            try:
                p.set_defaults({k: v})
            except Exception as e:  # jsonargparse: no such key
                raise ConfigError(f"--{k}: unknown option [in {f}]") from e
            origin[k] = f
    return origin


def _flag_error(p, name: str, args: list[str], e: Exception) -> ConfigError:
    """jsonargparse's type error for a flag as one line in the recipe's words: ``--distill.lr: expected a
    float, got 'abc'`` (the parser's own text when the flag cannot be told)."""
    import re

    from dskd.config import describe_type

    msg = " ".join(str(e).split())
    m = re.search(r'Parser key "([^"]+)"', msg)
    if m:
        key = f"--{m.group(1)}"
        action = p._option_string_actions.get(key)  # noqa: SLF001
        given = [args[i + 1] for i in range(len(args) - 1) if args[i] == key]
        if action is not None and given and _typehint(action) is not None:
            return ConfigError(f"{key}: expected {describe_type(_typehint(action))}, got {given[-1]!r}", flag=key[2:])
    return ConfigError(f"{msg} (see dskd {name} --help)")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if not k.startswith("__")}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _apply_placement(cfg: RunConfig, device: str | None, dtype: str | None) -> RunConfig:
    """``--device`` / ``--dtype`` set the model's and the evaluation's placement at once."""
    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None:
            cfg.model = dataclasses.replace(cfg.model, **{key: value})
            cfg.eval = dataclasses.replace(cfg.eval, **{key: value})
    return cfg


def parse_command(name: str, fn: Callable[..., Any], argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv`` for command ``name`` into the keyword arguments of ``fn`` (configs validated)."""
    from jsonargparse import ArgumentParser

    from dskd.config import from_dict

    p: ArgumentParser = build_parser(name, fn)
    sig = _signature(fn)
    args, configs = _normalise(p, name, list(argv), sig.positional)
    origin = _load_config_files(p, configs, sig)
    for flag in args:  # a flag wins over the file: its errors are the flag's
        origin.pop(flag[2:], None)
    try:
        ns = p.parse_args(args)
    except Exception as e:  # argparse.ArgumentError, jsonargparse's type errors
        raise _flag_error(p, name, args, e) from e
    d = _plain(ns.as_dict())
    d.pop("config", None)
    kwargs: dict[str, Any] = {}
    try:
        if sig.recipe:
            fields = {f.name for f in dataclasses.fields(RunConfig)}
            cfg = from_dict({k: d.pop(k) for k in list(d) if k in fields})
            kwargs[sig.recipe] = _apply_placement(cfg, d.pop("device", None), d.pop("dtype", None))
        for key, cls in sig.sections.items():
            kwargs[key] = from_dict(d.pop(key) or {}, cls, prefix=key)
    except ConfigError as e:  # a bound or choice: name the recipe file when the value came from one
        if e.flag in origin:
            raise ConfigError(f"{e} [in {origin[e.flag]}]", flag=e.flag) from e
        raise
    if sig.wants_argv:
        kwargs[RECIPE_ARGV] = _recipe_argv(list(argv), p, sig)
    params = inspect.signature(fn).parameters
    kwargs |= {k: ns[k] for k in d if k in params}
    return kwargs


def _recipe_argv(argv: list[str], p, sig: _Signature) -> list[str]:
    """The part of ``argv`` that sets the recipe: ``--config FILE`` and the dotted section flags."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    keep: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, _ = argv[i].partition("=")
        head = key.lstrip("-").split(".", 1)[0].rstrip("+")
        action = p._option_string_actions.get(key)  # noqa: SLF001
        takes = not eq and not (
            action is not None
            and _is_bool(_typehint(action))
            and (i + 1 >= len(argv) or argv[i + 1].lower() not in _TRUE_FALSE)
        )
        span = argv[i : i + 1 + int(takes)]
        if key.startswith("--") and (head in names or head in ("config", "device", "dtype")):
            keep += span
        i += len(span)
    return keep


# What a run folder of `dskd run` / `dskd experiment` may already hold (an earlier or unfinished run).
_RUN_FOLDER_ENTRIES = ("pipeline.json", "config.yaml", "lexicon", "senses", "students", "teacher_cache", "eval")
_TEXT_SUFFIXES = (".md", ".txt", "")
_FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def _holds_any(*names: str) -> Callable[[Any], bool]:
    return lambda path: any((path / n).exists() for n in names)


def _is_text_not_artefact(path: Any) -> bool:
    """A plain text file (a report table), not a JSON artefact a report would overwrite by mistake."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return not isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return True


def _is_coverage_json(path: Any) -> bool:
    """The numbers ``dskd senses coverage --out`` wrote before (a JSON object with its ``rows`` and ``corpus``)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and {"rows", "corpus"} <= set(d)


def check_outputs(name: str, kwargs: dict[str, Any]) -> None:
    """Check, before the command runs (before any model or corpus is read), every output command ``name``
    will write (:func:`dskd.io.check_output`): it can be created and written, and a target already there
    is the command's own kind. Raises :class:`ConfigError` naming the flag and the path."""
    from pathlib import Path

    from dskd.io import check_output

    out = kwargs.get("out")
    if name == "lexicon build":
        from dskd.lexicon import ARTEFACT

        check_output(out, "--out", folder=True, kind=ARTEFACT)
    elif name == "senses build":
        from dskd.senses.cli import STORE_ARTEFACT

        check_output(out, "--out", folder=True, kind=STORE_ARTEFACT)
    elif name == "eval" and out is None and not kwargs.get("list_tasks"):
        raise ConfigError("--out: required (a .json file)", flag="out")
    elif name in ("eval", "fidelity") and out is not None:
        if name == "eval":
            from dskd.report import RESULT_ARTEFACT
        else:
            from dskd.fidelity import RESULT_ARTEFACT
        check_output(out, "--out", folder=False, kind=RESULT_ARTEFACT)
        md = Path(out).with_suffix(".md")
        if Path(out).suffix != ".json":
            raise ConfigError(f"--out {out}: a result is a .json file (its table goes beside it as .md)", flag="out")
        check_output(md, "--out", folder=False, what="markdown table", accept=_is_text_not_artefact)
    elif name == "report" and out is not None:
        check_output(out, "--out", folder=False, what="markdown table", accept=_is_text_not_artefact)
    elif name == "senses coverage" and out is not None:
        if Path(out).suffix != ".md":
            raise ConfigError(
                f"--out {out}: the tables are a .md file (their numbers go beside it as .json)", flag="out"
            )
        check_output(out, "--out", folder=False, what="markdown table", accept=_is_text_not_artefact)
        numbers = Path(out).with_suffix(".json")
        check_output(numbers, "--out", folder=False, what="coverage table's numbers", accept=_is_coverage_json)
    elif name == "plot senses":
        if Path(out).suffix not in _FIGURE_SUFFIXES:
            raise ConfigError(f"--out {out}: a figure is a {', '.join(_FIGURE_SUFFIXES)} file", flag="out")
        check_output(out, "--out", folder=False, what="figure")
        check_output(Path(out).with_suffix(".json"), "--out", folder=False, what="figure's numbers")
    elif name in ("distill", "cache build", "run", "experiment"):
        cfg: RunConfig = next(v for v in kwargs.values() if isinstance(v, RunConfig))
        if name in ("run", "experiment") and kwargs.get("quick"):
            from dskd.pipeline import quick_config

            cfg = quick_config(cfg)
        run_dir = cfg.out_dir
        if name == "distill":
            from dskd.distill import RUN_ARTEFACT

            check_output(
                run_dir, "--out", folder=True, kind=RUN_ARTEFACT, accept=_holds_any("config.yaml", "checkpoints")
            )
        elif name == "cache build":
            from dskd.data import CACHE_ARTEFACT

            if cfg.distill.cache_dir:
                check_output(cfg.distill.cache_dir, "--distill.cache_dir", folder=True, kind=CACHE_ARTEFACT)
            else:  # <out>/../teacher_cache/<key>: a folder of caches
                check_output(run_dir.parent / "teacher_cache", "--out", folder=True, what="teacher cache folder")
        else:
            check_output(run_dir, "--out", folder=True, what="dskd run folder", accept=_holds_any(*_RUN_FOLDER_ENTRIES))
        if name != "cache build" and cfg.distill.cache_dir:
            from dskd.data import CACHE_ARTEFACT

            check_output(cfg.distill.cache_dir, "--distill.cache_dir", folder=True, kind=CACHE_ARTEFACT)


def _check_artefact_input(path: Any, flag: str, kind: Any, missing_ok: bool = False) -> None:
    """An input artefact folder given by ``flag``: its sidecar and data files whole (dskd.io), before
    any model loads; errors are the artefact's one line, with the flag in front."""
    from pathlib import Path

    from dskd.io import check_files, read_sidecar

    if path is None or (missing_ok and not Path(path).exists()):
        return
    try:
        read_sidecar(path, kind)
        if Path(path).is_dir():
            check_files(path, kind)
    except Exception as e:
        if not isinstance(e, DskdError):
            raise
        raise type(e)(f"{flag}: {e}") from e


def _check_text_inputs(cfg: RunConfig, name: str) -> None:
    """The recipe's text files read late in the work (``data.text_files``; for ``run`` / ``experiment``
    also the sense corpus's files): present, text, and (``.jsonl``) every line a document."""
    from pathlib import Path

    from dskd.corpus import check_text_files, file_documents, sources

    for f in cfg.data.text_files:
        path = Path(f).expanduser()
        if path.is_file():
            check_text_files([path], f, "--data.text_files", allow_empty=True)
        for _ in file_documents(path, flag="--data.text_files", max_chars=0):
            pass
    if name in ("run", "experiment"):
        sources([s for s in cfg.senses.corpus if not s.startswith("hf:") and s != "prompts"], "--senses.corpus")


def check_inputs(name: str, kwargs: dict[str, Any]) -> None:
    """Check the artefact folders a command will read later in its work (the lexicon and sense store
    of the sense loss, a teacher cache to reuse) before it starts: a missing, foreign or damaged one is
    one line naming the flag and the file, before any model loads."""

    def lexicon_kind():
        from dskd.lexicon import ARTEFACT

        return ARTEFACT

    def store_kind():
        from dskd.senses.cli import STORE_ARTEFACT

        return STORE_ARTEFACT

    if name == "senses build":
        _check_artefact_input(kwargs.get("lexicon_dir"), "--lexicon_dir", lexicon_kind())
    if name == "fidelity" and kwargs.get("senses_dir") and kwargs.get("lexicon_dir"):  # one alone: its own error
        _check_artefact_input(kwargs.get("lexicon_dir"), "--lexicon_dir", lexicon_kind())
        _check_artefact_input(kwargs.get("senses_dir"), "--senses_dir", store_kind())
    if name == "plot senses":
        _check_artefact_input(kwargs.get("store"), "--store", store_kind())
    if name in ("eval", "fidelity"):  # local model folders: config.json and whole weights
        from dskd.evaluate import resolve_model_spec
        from dskd.models import check_weights, resolve_spec

        specs = [kwargs.get("model")] if name == "eval" else [s.partition("=")[2] or s for s in kwargs["students"]]
        for spec in specs:
            if isinstance(spec, str) and not kwargs.get("list_tasks"):
                local = resolve_model_spec(spec)
                resolve_spec(local)  # a folder without config.json, a path that does not exist
                check_weights(local)
    recipe = next((v for v in kwargs.values() if isinstance(v, RunConfig)), None)
    if recipe is not None and name in ("distill", "cache build", "run", "experiment"):
        _check_text_inputs(recipe, name)
    if name in ("distill", "cache build"):
        cfg: RunConfig = next(v for v in kwargs.values() if isinstance(v, RunConfig))
        if cfg.loss.lam > 0 and name == "distill":
            _check_artefact_input(cfg.distill.lexicon_dir, "--distill.lexicon_dir", lexicon_kind())
            _check_artefact_input(cfg.distill.senses_dir, "--distill.senses_dir", store_kind())
        if cfg.distill.teacher_cache and cfg.distill.cache_dir and not kwargs.get("force"):
            from pathlib import Path

            from dskd.data import CACHE_ARTEFACT

            cache = Path(cfg.distill.cache_dir)
            if (cache / "meta.json").is_file():  # an existing cache is reused when it matches: whole?
                _check_artefact_input(cache, "--distill.cache_dir", CACHE_ARTEFACT, missing_ok=True)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv``, check the command's outputs and input artefacts (:func:`check_outputs`,
    :func:`check_inputs`) and call the function of command ``name``; an int result is the exit status."""
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    kwargs = parse_command(name, fn, argv)
    check_outputs(name, kwargs)
    check_inputs(name, kwargs)
    args = [kwargs.pop(k) for k in _signature(fn).positional]
    result = fn(*args, **kwargs)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def dispatch(commands: dict[str, tuple[str, str]] | None = None, argv: Sequence[str] | None = None) -> int:
    """Run the command named by the first one or two words of ``argv`` (default ``sys.argv[1:]``)."""
    commands = COMMANDS if commands is None else commands
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = sorted({n.split()[0] for n in commands if " " in n})
    if not argv or argv[0] in ("-h", "--help"):
        _print_overview(commands)
        return 0
    if argv[0] in ("-V", "--version"):
        from dskd import __version__

        print(f"dskd {__version__}")
        return 0
    name = None
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in commands:
        name, rest = f"{argv[0]} {argv[1]}", argv[2:]
    elif argv[0] in commands:
        name, rest = argv[0], argv[1:]
    elif argv[0] in groups:
        _print_overview({k: v for k, v in commands.items() if k.split()[0] == argv[0]})
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    if name is None:
        known = sorted({n.split()[0] for n in commands})
        near = difflib.get_close_matches(argv[0], known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        print(f"dskd: unknown command {argv[0]!r}{hint} (see dskd --help)", file=sys.stderr)
        return 2
    if name == "eval" and "--fidelity" in rest:  # the old spelling of `dskd fidelity`, kept for one release
        print("dskd: `dskd eval --fidelity` is now `dskd fidelity`", file=sys.stderr)
        name, rest = "fidelity", [a for a in rest if a != "--fidelity"]
    try:
        return run_command(name, rest)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except DskdError as e:
        print(f"dskd {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndskd {name}: interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130


def _print_overview(commands: dict[str, tuple[str, str]]) -> None:
    print("usage: dskd COMMAND [--config FILE.yaml] [options]   (dskd COMMAND --help for its options)\n")
    print("Decoder-based Sense Knowledge Distillation: sense dictionaries, KD/DSKD training, evaluation.\n")
    print("commands:")
    width = max(len(n) for n in commands) + 2
    for name, (_, help_) in commands.items():
        print(f"  {name:<{width}}{help_}")


def main(argv: list[str] | None = None) -> int:
    try:
        rc = dispatch(COMMANDS, argv)
        sys.stdout.flush()  # a pipe's buffered output fails here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:  # `dskd eval --list_tasks | head`: the reader left; no traceback (Python's recipe)
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe


__all__ = ["COMMANDS", "ConfigError", "build_parser", "dispatch", "main", "parse_command", "run_command"]
