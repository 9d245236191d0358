"""WinoGrande (fill the blank with one of two names). Validation in two hashed halves.

Scored as lm-eval does: each option fills the blank to make a different *context*, and the
log-likelihood of the shared rest of the sentence is compared.
"""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item, content_id
from dskd.tasks.halves import HalvesTask


class WinoGrande(HalvesTask):
    name = "winogrande"
    title = "WinoGrande"
    hf_dataset = "allenai/winogrande"
    aliases = ("wino",)
    folder = ("winogrande", "winogrande_xl", "validation")
    protocol = "validation (1,267) in two halves by a hash of the sentence: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        s = row["sentence"].strip()
        options = (row["option1"].strip(), row["option2"].strip())
        return Item(id=content_id(s, *options), question=s, choices=options, gold=int(row["answer"]) - 1)

    def loglik_requests(self, item: Item) -> list[tuple[str, str]]:
        i = item.question.index("_")
        rest = " " + item.question[i + 1 :].strip()
        return [(item.question[:i] + c, rest) for c in item.choices]

    def letter_block(self, item: Item) -> str:
        return (
            f"Fill in the blank: {item.question}\n"
            + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(item.choices))
            + "\nAnswer:"
        )
