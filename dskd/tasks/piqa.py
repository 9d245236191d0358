"""PIQA (physical commonsense: pick the better solution for a goal). Validation in two hashed halves."""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item, content_id
from dskd.tasks.halves import HalvesTask


class Piqa(HalvesTask):
    name = "piqa"
    title = "PIQA"
    hf_dataset = "ybisk/piqa"
    folder = ("piqa", "plain_text", "validation")
    protocol = "validation (1,838) in two halves by a hash of the goal: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        goal, sols = row["goal"].strip(), (row["sol1"].strip(), row["sol2"].strip())
        return Item(id=content_id(goal, *sols), question=goal, choices=sols, gold=int(row["label"]))
