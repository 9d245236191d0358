"""Generative scoring (``--scoring generate``): batched greedy decoding, answer parsing, SQuAD metrics.

The model answers every prompt with greedy decoding (transformers ``generate`` with its KV cache);
prompts are left-padded into batches of similar length, decoding stops at the end-of-sequence token,
at any stop sequence (``StopOnStrings``) or after the token budget, and the text is cut at the first
stop sequence. This is what lm-eval's ``generate_until`` does (same batch order, same tokenisation
rule, same decoding and cutting), so the two produce the same strings up to floating-point ties
(``benchmarks/eval_vs_lmeval.py`` measures it).

Scoring:

* Multiple choice (the prompt lists the choices as ``A. ... B. ...``): the answer is the first
  *label-like token* of the generation, parsed by :func:`parse_choice`, and it must equal the gold
  label (exact match of the answer letter). A generation without a valid label is wrong and counted
  in ``unparseable``.
* Extractive QA (``Task.kind == "qa"``, SQuAD): exact match and token F1 of the generation against
  every gold answer after SQuAD normalisation (:func:`normalize_answer`), the maximum over golds.

Per-item generations are kept in the result file, so a reader can check the parsing.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from dskd.config import ConfigError, EvalConfig
from dskd.metrics import progress_bar, setup_label, task_entry
from dskd.prompts import _chat, letter_prompt
from dskd.tasks import Item, Task
from dskd.tasks.base import LETTERS

QA_INSTRUCTION = "Answer the question with a short span copied from the background text."
DEFAULT_MAX_NEW_TOKENS = {"mc": 8, "qa": 50}
DEFAULT_STOP = ("\n",)


# ---- prompts -------------------------------------------------------------------------------------
def answer_text(task: Task, item: Item) -> str:
    """The gold answer an exemplar shows: its letter (multiple choice) or its first gold answer (QA)."""
    return item.answers[0] if task.kind == "qa" else LETTERS[item.gold]


def generation_prompt(task: Task, item: Item, exemplars: Sequence[Item], tokenizer, chat: bool) -> str:
    """The prompt whose greedy continuation is the model's answer to ``item``.

    Multiple choice: :func:`dskd.prompts.letter_prompt` (lettered choices, ending in ``Answer:`` or
    the chat template's generation prompt). Extractive QA: the same layout with the passage block
    (``Title: / Background: / Question: / Answer:``) and the first gold answer after each exemplar;
    with chat, ``QA_INSTRUCTION`` opens the first user turn.

    Args:
        task: The task that formats the question.
        item: The question to ask.
        exemplars: Solved examples shown first (training items only).
        tokenizer: Needed for its chat template when ``chat`` is on.
        chat: Wrap in the tokenizer's chat template.
    """
    if task.kind != "qa":
        return letter_prompt(task, item, exemplars, tokenizer, chat)
    block = task.qa_block  # type: ignore[attr-defined]
    if chat:
        turns = [(block(x), x.answers[0]) for x in exemplars]
        if turns:
            turns[0] = (f"{QA_INSTRUCTION}\n\n{turns[0][0]}", turns[0][1])
            return _chat(tokenizer, turns, block(item))
        return _chat(tokenizer, [], f"{QA_INSTRUCTION}\n\n{block(item)}")
    return "\n\n".join([*(f"{block(x)} {x.answers[0]}" for x in exemplars), block(item)])


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with lm-eval's rule for special tokens.

    A prompt that already starts with the BOS text (a rendered chat template) is encoded without
    special tokens; any other prompt gets the tokenizer's default ones (a BOS for Llama-3, nothing
    for GPT-2-style tokenizers), as the model saw in training.
    """
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    out: list[list[int] | None] = [None] * len(prompts)
    for flag in (True, False):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if not idx:
            continue
        kw = {"add_special_tokens": False} if flag else {}
        ids = tokenizer([prompts[i] for i in idx], **kw)["input_ids"]
        for i, x in zip(idx, ids, strict=True):
            out[i] = list(x)
    return out  # type: ignore[return-value]


# ---- decoding ------------------------------------------------------------------------------------
class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text contains one of ``stops``.

    Only the last few generated tokens are decoded at each step (enough to hold the longest stop
    sequence, even one byte per token): a stop completed at this step lies entirely in them, and a
    row once done stays done inside ``generate``.

    Args:
        tokenizer: Decodes token ids.
        stops: Stop sequences (non-empty strings).
        prompt_length: Padded prompt length T of the batch; generation starts at column T.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        self.window = max((len(s.encode()) for s in self.stops), default=0) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """Args: input_ids (B, T + t) prompt and generated ids. Returns (B,) bool: row finished."""
        new = input_ids[:, self.prompt_length :][:, -self.window :]  # (B, <= window)
        if not self.stops or new.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence (each applied in turn, as lm-eval does)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model takes (``max_position_embeddings``, default 4096)."""
    return int(getattr(model.config, "max_position_embeddings", 4096) or 4096)


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = DEFAULT_STOP,
    batch_size: int = 8,
    progress: Any = None,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Greedy continuation of every prompt, cut at the first stop sequence.

    Prompts are sorted longest first (lm-eval's order, so both tools form the same batches), left
    padded, and decoded together by ``model.generate`` with its KV cache on the model's device and
    dtype; the attention mask keeps padding out, and Llama-style models derive position ids from it,
    so a batched row decodes like the prompt alone up to floating-point rounding. A prompt longer
    than the model's context minus the budget loses tokens from the left.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer.
        prompts: Prompt strings.
        max_new_tokens: Token budget per prompt (>= 1).
        stop: Stop sequences; the end-of-sequence token always stops.
        batch_size: Prompts decoded together.
        progress: A tqdm bar advanced by the number of prompts of each batch.
        token_ids: The prompts already encoded (default: :func:`encode_prompts`).

    Returns:
        The generated text of each prompt, in the order of ``prompts``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--eval.max_new_tokens: the generation budget must be >= 1 (got {max_new_tokens})")
    ids = [list(x) for x in (token_ids if token_ids is not None else encode_prompts(tokenizer, prompts))]
    room = max_positions(model) - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--eval.max_new_tokens: {max_new_tokens} leaves no room for the prompt ({max_positions(model)})"
        )
    ids = [x[-room:] for x in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), prompts[i]))
    out: list[str] = [""] * len(ids)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        T = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), T), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), T), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(ids[i])
            input_ids[r, T - n :] = torch.tensor(ids[i])  # left padding: every row ends at column T
            attention[r, T - n :] = 1
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stop, T)]),
            pad_token_id=pad,
            use_cache=True,
        )  # (B, T + t)
        texts = tokenizer.batch_decode(gen[:, T:].tolist(), skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            out[i] = cut_at_stops(text, stop)
        if progress is not None:
            progress.update(len(batch))
    return out


# ---- answers -------------------------------------------------------------------------------------
_LEAD = "*_\"'`([ \t\n"
_ANSWER_PREFIX = re.compile(
    r"(?:the\s+)?(?:correct\s+|right\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*", re.I
)
_LABEL = re.compile(r"([A-Z]|[0-9]+)(?![A-Za-z0-9])")


def parse_choice(text: str, labels: Sequence[str]) -> int | None:
    """The choice a generated answer names, by its first label-like token, or None.

    The rule: strip leading white space, markup and opening brackets/quotes (``* _ " ' ` ( [``);
    drop one leading phrase like ``Answer:``, ``The answer is`` or ``The correct option is`` (case
    insensitive) and strip again; the text must then start with a *label-like token*: one capital
    letter or a number, not followed by a letter or digit (``B``, ``B.``, ``B)``, ``(B)``, ``**B**``
    and ``B. fire`` all give B; ``Bus``, ``b`` and ``I think B`` give nothing). The token names
    the choice whose label it equals; anything else (no such token, or a label the prompt does
    not show, such as ``E`` for four choices) is unparseable, which scores as wrong. Because the
    rule looks at the start only, an answer opening with the article "A" reads as the letter A.

    Args:
        text: The generation.
        labels: The labels the prompt gave the choices, in order (``A``, ``B``, ... or ``1``, ``2``, ...).

    Returns:
        The index of the named choice, or None when the generation names none.
    """
    s = text.lstrip(_LEAD)
    m = _ANSWER_PREFIX.match(s)
    if m is not None:
        s = s[m.end() :].lstrip(_LEAD)
    m = _LABEL.match(s)
    if m is None or m[1] not in labels:
        return None
    return list(labels).index(m[1])


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings (bag of words); two empty answers score 1 (SQuAD v2 rule)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of ``prediction``: the maximum of each over the gold answers."""
    if not golds:
        raise ValueError("squad_scores needs at least one gold answer")
    return max(exact_match(prediction, g) for g in golds), max(token_f1(prediction, g) for g in golds)


# ---- a task --------------------------------------------------------------------------------------
def score_generate(
    model: nn.Module, tokenizer, task: Task, items: Sequence[Item], cfg: EvalConfig, progress: bool = False
) -> dict[str, Any]:
    """Generate an answer to every item and score it; the task's entry of a result file.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer.
        task: The task (multiple choice or extractive QA).
        items: Items to score.
        cfg: Shots, chat, batch size, budget (``max_new_tokens``), ``stop``, bootstrap, seed.
        progress: Show a tqdm bar with items/s on stderr.

    Returns:
        ``metrics`` (multiple choice: ``acc`` and ``unparseable``, the share of generations naming
        no valid choice; QA: ``em`` and ``f1``; each with a bootstrap ``*_stderr``), ``primary``,
        ``setup``, ``n``, timings, the budget and stop sequences, and per-item ``items`` with each
        ``generation`` (and ``pred``, -1 when unparseable; or per-item ``em`` / ``f1``).
    """
    t0 = time.perf_counter()
    budget = cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]
    stop = list(cfg.stop) if cfg.stop is not None else list(DEFAULT_STOP)
    prompts = [generation_prompt(task, x, task.exemplars(x, cfg.shots, cfg.seed), tokenizer, cfg.chat) for x in items]
    token_ids = encode_prompts(tokenizer, prompts)
    bar = progress_bar(progress, len(items), f"{task.name} (generate)")
    t1 = time.perf_counter()
    texts = generate_texts(model, tokenizer, prompts, budget, stop, cfg.batch_size, bar, token_ids)
    t_score = time.perf_counter() - t1
    if bar is not None:
        bar.close()
    rec: dict[str, Any] = {"id": [x.id for x in items], "generation": texts}
    scores: dict[str, np.ndarray] = {}
    extra: dict[str, float] = {}
    if task.kind == "qa":
        pairs = [squad_scores(t, x.answers) for t, x in zip(texts, items, strict=True)]
        scores["em"] = np.array([p[0] for p in pairs])
        scores["f1"] = np.array([p[1] for p in pairs])
        rec |= {"gold": [list(x.answers) for x in items], "em": scores["em"].tolist(), "f1": scores["f1"].tolist()}
        primary = "f1"
    else:
        pred = []
        for t, x in zip(texts, items, strict=True):
            p = parse_choice(t, LETTERS[: len(x.choices)])
            pred.append(-1 if p is None else p)
        gold = [x.gold for x in items]
        scores["acc"] = np.array([p == g for p, g in zip(pred, gold, strict=True)], dtype=float)
        extra["unparseable"] = float(np.mean([p < 0 for p in pred])) if pred else 0.0
        rec |= {"gold": gold, "pred": pred}
        primary = "acc"
    return task_entry(
        task,
        items,
        scores,
        rec,
        cfg,
        primary=primary,
        setup=setup_label(cfg) + (", token F1 / exact match" if task.kind == "qa" else ", answer letter"),
        seconds=time.perf_counter() - t0,
        score_seconds=t_score,
        tokens=sum(len(x) for x in token_ids),
        extra_metrics=extra,
        max_new_tokens=budget,
        stop=stop,
    )


__all__ = [
    "StopOnStrings",
    "cut_at_stops",
    "encode_prompts",
    "exact_match",
    "generate_texts",
    "generation_prompt",
    "normalize_answer",
    "parse_choice",
    "score_generate",
    "squad_scores",
    "token_f1",
]
