"""Command-line plumbing shared by the stage modules: dispatch, parsers, error reporting.

Every subcommand is a function ``main(argv: list[str]) -> int`` living in the module of its stage;
:mod:`dskd.__main__` holds the table from command name to that function. Modules are imported only
when their command runs, so ``dskd --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from dskd.config import ConfigError, DskdError, RunConfig


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A plain parser for a subcommand; the description's first line is its one-line summary."""
    return argparse.ArgumentParser(
        prog=f"dskd {prog}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def config_parser(prog: str, description: str, cls: type = RunConfig):
    """A parser taking ``--config FILE.yaml`` plus dotted overrides of every field of ``cls``
    (``--loss.lam 0 --distill.lr 3e-4``); later flags win over the file."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=f"dskd {prog}", description=description, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="A YAML recipe (see configs/).")
    p.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    if cls is RunConfig:
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
    return p


def parse_config(p, argv: Sequence[str], cls: type = RunConfig) -> tuple[Any, Any]:
    """Parse and validate; returns (config dataclass, namespace of the extra flags)."""
    import dataclasses

    ns = p.parse_args(list(argv))
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in ns.as_dict().items() if k in names}
    from dskd.config import from_dict

    cfg = from_dict(_plain(data), cls)
    extra = {k: v for k, v in ns.as_dict().items() if k not in names and k != "config"}
    if cls is RunConfig:
        cfg = _apply_placement(cfg, extra.pop("device", None), extra.pop("dtype", None))
    return cfg, argparse.Namespace(**extra)


def _apply_placement(cfg: RunConfig, device: str | None, dtype: str | None) -> RunConfig:
    """``--device`` / ``--dtype`` set the model's and the evaluation's placement at once."""
    import dataclasses

    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None:
            cfg.model = dataclasses.replace(cfg.model, **{key: value})
            cfg.eval = dataclasses.replace(cfg.eval, **{key: value})
    return cfg


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if not k.startswith("__")}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def dispatch(commands: dict[str, tuple[str, str]], argv: Sequence[str] | None = None) -> int:
    """Run the command named by the first one or two words of ``argv``.

    Args:
        commands: name (``"assets"``, ``"lexicon build"``) -> (``"module:function"``, one-line help).
        argv: Arguments without the program name (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = sorted({name.split()[0] for name in commands if " " in name})
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
        import difflib

        known = sorted({n.split()[0] for n in commands})
        near = difflib.get_close_matches(argv[0], known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        print(f"dskd: unknown command {argv[0]!r}{hint} (see dskd --help)", file=sys.stderr)
        return 2
    target, _ = commands[name]
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    try:
        return int(fn(rest) or 0)
    except DskdError as e:
        print(f"dskd {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndskd {name}: interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130


def _print_overview(commands: dict[str, tuple[str, str]]) -> None:
    print("usage: dskd COMMAND [options]   (dskd COMMAND --help for its options)\n")
    print("Decoder-based Sense Knowledge Distillation: sense dictionaries, KD/DSKD training, evaluation.\n")
    print("commands:")
    width = max(len(n) for n in commands) + 2
    for name, (_, help_) in commands.items():
        print(f"  {name:<{width}}{help_}")


__all__ = ["ConfigError", "config_parser", "dispatch", "parse_config", "parser"]
