"""OpenBookQA (elementary science, four choices). Validation in two hashed halves."""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item
from dskd.tasks.halves import HalvesTask


class OpenBookQA(HalvesTask):
    name = "openbookqa"
    title = "OpenBookQA"
    hf_dataset = "allenai/openbookqa"
    aliases = ("obqa",)
    folder = ("openbookqa", "main", "validation")
    protocol = "validation (500) in two halves by a hash of the question: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        labels = list(row["choices"]["label"])
        return Item(
            id=str(row["id"]),
            question=row["question_stem"].strip(),
            choices=tuple(t.strip() for t in row["choices"]["text"]),
            gold=labels.index(row["answerKey"].strip()),
        )

    def query(self, item: Item) -> str:
        return item.question  # lm-eval: the stem is continued directly by the answer
