"""How tasks become prompts: item selection, few-shot exemplars, chat templates, lettered-choice and
log-likelihood requests. Shared by evaluation (:mod:`dskd.evaluate`), the training data
(:mod:`dskd.data`), the held-out fidelity prompts (:mod:`dskd.fidelity`) and the planner, without
importing the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dskd.config import ConfigError
from dskd.tasks import Item, Task
from dskd.tasks.base import LETTERS

LETTER_INSTRUCTION = "Answer with the letter of the correct choice."


def _chat(tokenizer, turns: list[tuple[str, str]], last: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--eval.chat / --data.chat: this tokenizer has no chat template; set it to false")
    messages: list[dict[str, str]] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": last})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def letter_prompt(task: Task, item: Item, exemplars: Sequence[Item], tokenizer, chat: bool) -> str:
    """The lettered-choice prompt of ``item``, ending exactly where the answer letter goes.

    Without chat: solved exemplars (``...Answer: B``) separated by blank lines, then the question
    ending in ``Answer:`` (the letter follows after a space). With chat: one user/assistant turn per
    exemplar (the assistant says the letter), the question as the last user turn, then the
    template's generation prompt (the letter follows directly).

    Args:
        task: The task that formats the question.
        item: The question to ask.
        exemplars: Solved examples shown first (from ``task.train_items()``).
        tokenizer: Needed for its chat template when ``chat`` is on.
        chat: Wrap in the tokenizer's chat template.
    """
    if chat:
        turns = [(task.letter_block(x), LETTERS[x.gold]) for x in exemplars]
        if turns:
            turns[0] = (f"{LETTER_INSTRUCTION}\n\n{turns[0][0]}", turns[0][1])
            last = task.letter_block(item)
        else:
            last = f"{LETTER_INSTRUCTION}\n\n{task.letter_block(item)}"
        return _chat(tokenizer, turns, last)
    shots = [f"{task.letter_block(x)} {LETTERS[x.gold]}" for x in exemplars]
    return "\n\n".join([*shots, task.letter_block(item)])


def training_prompt(task: Task, item: Item, exemplars: Sequence[Item], tokenizer, chat: bool, style: str) -> str:
    """The distillation prompt of ``item`` in ``style`` (``data.style``): ``letter``, ending where the
    answer letter goes (:func:`letter_prompt`); ``cloze``, the question as log-likelihood scoring asks
    it, ending where the answer text goes (the context of :func:`loglik_requests`). Used for the
    training prompts and for the held-out prompts built like them."""
    if style == "cloze":
        return loglik_requests(task, item, exemplars, tokenizer, chat)[0][0]
    if style == "letter":
        return letter_prompt(task, item, exemplars, tokenizer, chat)
    raise ConfigError(f"--data.style: must be letter or cloze (got {style!r})")


def loglik_requests(task: Task, item: Item, exemplars: Sequence[Item], tokenizer, chat: bool) -> list[tuple[str, str]]:
    """(context, continuation) per choice for ``loglik`` scoring, few-shot exemplars included."""
    reqs = task.loglik_requests(item)
    if chat:
        turns = []
        for x in exemplars:
            ctx, cont = task.loglik_requests(x)[x.gold]
            turns.append((ctx, cont.strip()))
        return [(_chat(tokenizer, turns, ctx), cont.strip()) for ctx, cont in reqs]
    prefix = "".join(task.cloze_example(x) + "\n\n" for x in exemplars)
    return [(prefix + ctx, cont) for ctx, cont in reqs]


def letter_requests(task: Task, item: Item, exemplars: Sequence[Item], tokenizer, chat: bool) -> list[tuple[str, str]]:
    """(prompt, letter) per choice for ``letter`` scoring."""
    prompt = letter_prompt(task, item, exemplars, tokenizer, chat)
    sep = "" if chat else " "
    return [(prompt, sep + LETTERS[i]) for i in range(len(item.choices))]


def select_items(task: Task, limit: int) -> list[Item]:
    """Evaluation items, at most ``limit`` (0: all) in file order; per subject for tasks with subjects."""
    items = task.eval_items()
    if not limit:
        return items
    if not task.has_subjects:
        return items[:limit]
    seen: dict[str | None, int] = {}
    out = []
    for x in items:
        if seen.get(x.subject, 0) < limit:
            seen[x.subject] = seen.get(x.subject, 0) + 1
            out.append(x)
    return out


def subject_quota(subjects: Sequence[Any], limit: int) -> dict[Any, int]:
    """Items per subject for ``limit`` items spread over ``subjects``: ``limit // S`` each, and one
    more for ``limit % S`` evenly spaced subjects (so the quotas sum to ``limit``)."""
    S = len(subjects)
    base, rem = divmod(limit, S) if S else (0, 0)
    extra = {k * S // rem for k in range(rem)} if rem else set()
    return {s: base + (i in extra) for i, s in enumerate(subjects)}
