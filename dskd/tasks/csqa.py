"""CommonsenseQA (five choices). Validation in two hashed halves."""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item
from dskd.tasks.halves import HalvesTask


class CommonsenseQA(HalvesTask):
    name = "csqa"
    title = "CommonsenseQA"
    hf_dataset = "tau/commonsense_qa"
    aliases = ("commonsense_qa", "commonsenseqa")
    folder = ("tau", "commonsense_qa", "none", "validation")
    protocol = "validation (1,221) in two halves by a hash of the question: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        labels = list(row["choices"]["label"])
        return Item(
            id=str(row["id"]),
            question=row["question"].strip(),
            choices=tuple(t.strip() for t in row["choices"]["text"]),
            gold=labels.index(row["answerKey"].strip()),
        )
