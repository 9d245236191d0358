"""PrefixMemo: bottom layers shared by a teacher and its truncated students computed once, results unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model
from fakes import FixedShots, ToyTask

from dskd import fidelity as F
from dskd.config import EvalConfig
from dskd.evaluate import evaluate, loglik_requests, score_task
from dskd.loglik import _pack, build_groups, score_groups
from dskd.models import truncate
from dskd.prefix import PrefixMemo, prefix_fingerprint

N_SHARED = 2  # the students keep 4 of the teacher's 6 layers and train the top 2


def _perturb(layers, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def models(tokenizer):
    """A 6-layer teacher, its untrained 4-layer truncation, a 'trained' one (top 2 layers moved) and one
    whose bottom layer moved (it shares no prefix with the teacher)."""
    teacher = make_model(len(tokenizer), layers=6, seed=3)
    untrained = truncate(teacher, 4)
    trained = truncate(teacher, 4)
    _perturb(trained.model.layers[N_SHARED:], seed=1)
    bottom = truncate(teacher, 4)
    _perturb(bottom.model.layers[:1], scale=0.01, seed=2)
    return {m: x.eval() for m, x in dict(teacher=teacher, untrained=untrained, trained=trained, bottom=bottom).items()}


def _groups(tokenizer, shots: int = 0):
    task = ToyTask()
    return build_groups(
        tokenizer, [loglik_requests(task, x, task.exemplars(x, shots), tokenizer, False) for x in task.eval_items()]
    )


def _plain(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def test_memo_serves_students_the_teachers_prefix_bit_for_bit(models, tokenizer):
    groups = _groups(tokenizer)
    # a packed batch with its 4D additive mask, as the scorer builds it
    ids, mask, pos, _ = _pack(groups, tokenizer.pad_token_id, 1 << 30, torch.float32, [[0, 1], [2], [3, 4, 5]])
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    memo = PrefixMemo(N_SHARED)
    fps = {m: prefix_fingerprint(x, N_SHARED) for m, x in models.items()}
    assert fps["teacher"] == fps["untrained"] == fps["trained"] != fps["bottom"]
    out = memo.hidden(models["teacher"], **batch)
    assert torch.equal(out, _plain(models["teacher"], **batch))
    assert memo.stats["misses"] == 1 and memo.stats["stored"] == 1
    assert memo.stats["bytes"] == ids.numel() * models["teacher"].config.hidden_size * 4
    for k, name in enumerate(("untrained", "trained")):
        out = memo.hidden(models[name], **batch)
        assert torch.equal(out, _plain(models[name], **batch)), name
        assert memo.stats["hits"] == k + 1 and memo.stats["misses"] == 1
    # served twice: the stored state is not modified by a suffix run
    assert torch.equal(memo.hidden(models["trained"], **batch), _plain(models["trained"], **batch))
    # a bottom layer that differs: another fingerprint, a miss, and still the model's own result
    out = memo.hidden(models["bottom"], **batch)
    assert memo.stats["misses"] == 2 and torch.equal(out, _plain(models["bottom"], **batch))
    # other inputs (one token changed, or another mask) miss
    ids2 = ids.clone()
    ids2[0, 0] = (ids2[0, 0] + 1) % len(tokenizer)
    memo.hidden(models["trained"], **{**batch, "input_ids": ids2})
    assert memo.stats["misses"] == 3
    mask2 = torch.ones_like(ids)
    out = memo.hidden(models["untrained"], input_ids=ids, attention_mask=mask2)
    assert memo.stats["misses"] == 4 and torch.equal(
        out, _plain(models["untrained"], input_ids=ids, attention_mask=mask2)
    )
    hits = memo.stats["hits"]
    memo.clear()
    assert memo.stats["bytes"] == 0 and memo.stats["hits"] == hits
    memo.hidden(models["trained"], **batch)
    assert memo.stats["hits"] == hits  # nothing left to hit
    assert "shared prefix: 2 layers reused for" in memo.describe()


def test_score_groups_with_a_memo_equals_without(models, tokenizer):
    groups = _groups(tokenizer, shots=1)
    pad = tokenizer.pad_token_id
    memo = PrefixMemo(N_SHARED)
    for name in ("teacher", "untrained", "trained", "bottom"):
        before = dict(memo.stats)
        with_memo = score_groups(models[name], groups, batch_size=3, pad_id=pad, memo=memo)
        assert with_memo == score_groups(models[name], groups, batch_size=3, pad_id=pad), name
        hits, calls = memo.stats["hits"] - before["hits"], memo.calls(before)
        assert calls > 1
        assert hits == (0 if name in ("teacher", "bottom") else calls), name


def test_score_task_and_evaluate_with_a_memo_equal_without(models, tokenizer, tmp_path):
    task = ToyTask()
    items = task.eval_items()
    cfg = EvalConfig(tasks=["toy"], batch_size=2, bootstrap=20)
    memo = PrefixMemo(N_SHARED)
    for name in ("teacher", "trained"):
        a = score_task(models[name], tokenizer, task, items, cfg, memo=memo)
        b = score_task(models[name], tokenizer, task, items, cfg)
        assert a["items"] == b["items"] and a["metrics"] == b["metrics"], name
    assert memo.stats["hits"] == memo.stats["misses"] > 0
    # questions shown the same exemplars go through the shared KV-cache path, which leaves the memo alone
    fixed, fcfg = FixedShots(), EvalConfig(tasks=["toy"], shots=2, batch_size=2, bootstrap=0)
    memo = PrefixMemo(N_SHARED)
    for name in ("teacher", "trained"):
        a = score_task(models[name], tokenizer, fixed, items, fcfg, memo=memo)
        assert a["items"] == score_task(models[name], tokenizer, fixed, items, fcfg)["items"], name
    assert memo.calls() == 0
    # the whole evaluation on a packaged task, teacher first: the student's results equal its plain ones
    ecfg = EvalConfig(tasks=["arc_easy"], limit=5, batch_size=2, bootstrap=20)
    memo = PrefixMemo(N_SHARED)
    res = {}
    for name in ("teacher", "untrained"):
        for use in (memo, None):
            r = evaluate(name, ecfg, tmp_path / f"{name}{use is None}.json", models[name], tokenizer, False, memo=use)
            res[name, use is None] = r["tasks"]["arc_easy"]
    for name in ("teacher", "untrained"):
        assert res[name, False]["items"] == res[name, True]["items"]
        assert res[name, False]["metrics"] == res[name, True]["metrics"]
    assert memo.stats["hits"] == memo.stats["misses"] > 0


def test_fidelity_with_a_memo_equals_without(models, tokenizer):
    texts = ["The red car and the blue bus.", "The opposite of hot is cold.", "Prices rise and fall in the city."]
    docs = [F.Doc(f"d{i}", torch.tensor(tokenizer(t)["input_ids"])) for i, t in enumerate(texts)]
    students = {m: models[m] for m in ("untrained", "trained", "bottom")}
    memo = PrefixMemo(N_SHARED)
    a = F.measure(models["teacher"], students, docs, len(tokenizer), tokenizer.pad_token_id, 24, memo=memo)
    b = F.measure(models["teacher"], students, docs, len(tokenizer), tokenizer.pad_token_id, 24)
    assert a.keys() == b.keys()
    for m in a:
        for k in F.SUMS:
            assert (a[m][k] == b[m][k]).all(), (m, k)
    batches = memo.stats["misses"] // 2  # per batch: the teacher and the bottom-perturbed student miss
    assert batches >= 2 and memo.stats["hits"] == 2 * batches


def test_a_tiny_cap_stores_nothing_and_results_stay_right(models, tokenizer):
    groups = _groups(tokenizer)
    pad = tokenizer.pad_token_id
    logs = []
    memo = PrefixMemo(N_SHARED, max_bytes=16, log=logs.append)
    for name in ("teacher", "trained"):
        assert score_groups(models[name], groups, 2, pad, memo=memo) == score_groups(models[name], groups, 2, pad)
    assert memo.stats["stored"] == 0 and memo.stats["bytes"] == 0 and memo.stats["hits"] == 0
    assert memo.stats["unstored"] == memo.stats["misses"] > 1
    assert len(logs) == 1 and "memory cap" in logs[0]


def test_models_that_do_not_split_run_whole(models, tokenizer, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    # learned position embeddings are added to inputs_embeds again: split_ok refuses the split
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=256, bos_token_id=1)
    ).eval()
    other = copy.deepcopy(gpt2)
    _perturb(other.transformer.h[2:], seed=4)
    groups = _groups(tokenizer)
    pad = tokenizer.pad_token_id
    memo = PrefixMemo(N_SHARED)
    for m in (gpt2, other):
        assert score_groups(m, groups, 3, pad, memo=memo) == score_groups(m, groups, 3, pad)
    assert memo.stats["whole"] > 0 and memo.stats["hits"] == memo.stats["misses"] == memo.stats["stored"] == 0
    # more shared layers than a model has, and n = 0: run whole
    for n, model in ((5, models["trained"]), (0, models["teacher"])):
        memo = PrefixMemo(n)
        assert not memo.splits(model)
        assert score_groups(model, groups, 3, pad, memo=memo) == score_groups(model, groups, 3, pad)
        assert memo.stats["whole"] > 0 and memo.stats["misses"] == 0
    # a split the probe refuses (monkeypatched) is never used
    import dskd.prefix as P

    monkeypatch.setattr(P, "split_ok", lambda model, n: False)
    memo = PrefixMemo(N_SHARED)
    assert score_groups(models["trained"], groups, 3, pad, memo=memo) == score_groups(models["trained"], groups, 3, pad)
    assert memo.stats["misses"] == 0 and memo.stats["whole"] > 0
    with pytest.raises(ValueError, match="n_layers"):
        PrefixMemo(-1)
