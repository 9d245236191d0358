"""HellaSwag (pick the ending of a video caption). Validation in two halves by a hash of the video id.

Text is cleaned as lm-eval does (``[title]`` markers become ". ", other bracketed tags are dropped);
the query is ``"{activity}: {ctx_a} {Ctx_b}"`` and each ending continues it after a space.
"""

from __future__ import annotations

import re
from typing import Any

from dskd.tasks.base import Item, content_id
from dskd.tasks.halves import HalvesTask


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(HalvesTask):
    name = "hellaswag"
    title = "HellaSwag"
    hf_dataset = "Rowan/hellaswag"
    folder = ("hellaswag", "none", "validation")
    protocol = "validation (10,042) in two halves by a hash of the source video: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        question = _clean(f"{row['activity_label']}: {ctx}")
        endings = tuple(_clean(e) for e in row["endings"])
        return Item(
            id=f"{row['ind']}-{content_id(question, *endings)[:8]}",
            question=question,
            choices=endings,
            gold=int(row["label"]),
            subject=row["activity_label"],
        )

    def split_key(self, item: Item, row: dict[str, Any]) -> str:
        return str(row.get("source_id") or item.question)

    def query(self, item: Item) -> str:
        return item.question

    def letter_block(self, item: Item) -> str:
        lines = [f"Complete the description: {item.question}"]
        lines += [f"{chr(65 + i)}. {c}" for i, c in enumerate(item.choices)]
        return "\n".join(lines) + "\nAnswer:"
