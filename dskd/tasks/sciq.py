"""SciQ (science questions with a support paragraph). Validation in two hashed halves.

The dataset lists the correct answer after three distractors; the choices are put in a fixed order
drawn from a hash of the question, so the letter of the gold answer is not always D.
"""

from __future__ import annotations

import random
from typing import Any

from dskd.tasks.base import Item, content_id
from dskd.tasks.halves import HalvesTask


class SciQ(HalvesTask):
    name = "sciq"
    title = "SciQ"
    hf_dataset = "allenai/sciq"
    folder = ("sciq", "none", "validation")
    protocol = "validation (1,000) in two halves by a hash of the question: train/exemplars | eval"

    def row_to_item(self, row: dict[str, Any]) -> Item:
        q = row["question"].strip()
        options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        options = [str(o).strip() for o in options]
        iid = content_id(q, *options)
        order = list(range(4))
        random.Random(iid).shuffle(order)
        return Item(
            id=iid,
            question=q,
            choices=tuple(options[i] for i in order),
            gold=order.index(3),
            context=(row.get("support") or "").strip() or None,
        )
