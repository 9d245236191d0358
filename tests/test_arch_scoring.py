"""Packed scoring on every architecture of the matrix: packed == per-choice, or the documented refusal.

Groups here are longer than the matrix's sliding window (8 tokens), several share a row, and a
cluster of them shares a cached prefix, so a sliding-window layer that attended past its window
(one 4D mask for every layer) would show. Each family either packs exactly or its self-check
refuses packing, after which every choice is scored by the model's own forward. Each family's finding
is the "packed scoring" column of docs/architectures.md's table (``archs.record``, see tests/archs.py).
"""

from __future__ import annotations

import warnings

import archs
import pytest
import torch
from archs import ARCHS, SLIDING, WINDOW, build

import dskd.loglik as E
from dskd.loglik import Group, packing_ok, score_groups, score_reference
from dskd.prefix import PrefixMemo

VOCAB = 97
TOL = 1e-4  # float32 eager: packed and per-choice agree to ~3e-6 (measured); a window leak is > 1e-2
# Every family must pack: Cohere's and Granite's output scaling is applied by dskd.models.lm_head_logits.


def _groups() -> list[Group]:
    """Groups of 4 to 25 tokens, 1 to 6 tokens per continuation; contexts 5-8 share a 20-token prefix."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    out = [Group(i, [0, 1, 2], ids(n), [ids(k) for k in (1, 4, 6)]) for i, n in enumerate((3, 9, 14, 20))]
    shared = ids(20)
    out += [Group(4 + i, [0, 1], shared + ids(n), [ids(k) for k in (2, 5)]) for i, n in enumerate((1, 3, 6, 10))]
    return out


KEYS = [None] * 4 + ["shots"] * 4  # the last four share their exemplars: one cached prefix


@pytest.fixture(scope="module")
def groups() -> list[Group]:
    gs = _groups()
    assert max(g.length for g in gs) > 3 * WINDOW
    return gs


def _close(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) / max(1.0, abs(y)) for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True))


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    monkeypatch.setattr(E, "_PACKING_CHECKED", E.weakref.WeakKeyDictionary())
    monkeypatch.setattr(E, "_SHARING_CHECKED", E.weakref.WeakKeyDictionary())


@pytest.mark.parametrize("name", list(ARCHS))
def test_packed_scoring_equals_per_choice_or_is_refused(name, groups):
    model = build(name, VOCAB)
    ref = [score_reference(model, g) for g in groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = packing_ok(model, E._probes(groups), 0)
    assert ok, f"{name}: the self-check refused packing"
    # several groups per row, shared-prefix clusters, and a memo of the bottom 2 layers
    assert _close(score_groups(model, groups, batch_size=2, pad_id=0, packed=True), ref) <= TOL
    assert _close(score_groups(model, groups, 2, 0, packed=True, keys=KEYS), ref) <= TOL
    assert E._SHARING_CHECKED[model][0], f"{name}: shared-prefix scoring refused"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memo = PrefixMemo(2)
        for _ in range(2):  # the second pass is served from the memo where the model takes it
            assert _close(score_groups(model, groups, 2, 0, packed=True, memo=memo), ref) <= TOL
    archs.record(name, "packed_scoring", "exact")


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_one_mask_for_every_layer_leaks_past_the_window_and_the_check_catches_it(name, groups, monkeypatch):
    """The old packing (one full-attention mask for sliding layers too) gives wrong scores on groups
    longer than the window; the self-check on the longest group refuses it, the shortest alone would not."""
    model = build(name, VOCAB)
    ref = [score_reference(model, g) for g in groups]
    monkeypatch.setattr(E, "attention_windows", lambda m: {"full_attention": None})
    wrong = score_groups(model, groups, 2, 0, packed=True)
    assert _close(wrong, ref) > 1e-3
    short, long = E._probes(groups)
    # its tokens sit at positions < WINDOW, so nothing slides within it: it cannot show the leak
    assert len(short.ctx) + max(len(c) for c in short.conts) - 1 <= WINDOW
    assert packing_ok(model, [short], 0)
    assert not packing_ok(model, [short, long], 0)  # the longest does (and the refusal is remembered)
    assert not packing_ok(model, [short], 0)


def test_packing_is_checked_again_for_a_longer_group(monkeypatch):
    seen = []
    monkeypatch.setattr(E, "_packing_check", lambda m, g, *a: seen.append(g.length) or True)
    model = torch.nn.Linear(1, 1)
    short, mid, long = (Group(0, [0, 1], [5] * n, [[6], [7, 8]]) for n in (2, 10, 30))
    assert packing_ok(model, [short, mid], 0) and packing_ok(model, [short, mid], 0)
    assert packing_ok(model, [short, long], 0)
    assert seen == [short.length, mid.length, long.length]


def test_bos_follows_lm_eval_for_the_gemma_family(tokenizer):
    from dskd.loglik import build_groups, wants_bos

    assert wants_bos(build("gemma3-text", VOCAB)) and wants_bos(build("gemma3-mm", VOCAB))
    assert not wants_bos(build("llama", VOCAB))
    reqs = [[("Question: what is red?\nAnswer:", " crimson"), ("Question: what is red?\nAnswer:", " blue")]]
    plain, with_bos = build_groups(tokenizer, reqs), build_groups(tokenizer, reqs, bos=True)
    bos = tokenizer.bos_token_id
    assert bos is not None and plain[0].ctx[0] != bos
    assert with_bos[0].ctx == [bos, *plain[0].ctx] and with_bos[0].conts == plain[0].conts
    # a context that already starts with BOS (a rendered chat template) gets no second one
    chat = [[(tokenizer.bos_token + "Q?\nA:", " red")]]
    assert build_groups(tokenizer, chat, bos=True)[0].ctx == build_groups(tokenizer, chat)[0].ctx
