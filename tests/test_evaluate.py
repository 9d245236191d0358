"""The scorer against brute force on a tiny model, metrics, prompts, result files and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model
from fakes import FixedShots, ToyTask

from dskd.__main__ import main as dskd_main
from dskd.config import EvalConfig
from dskd.evaluate import (
    bootstrap_samples,
    build_groups,
    evaluate,
    letter_prompt,
    letter_requests,
    loglik_requests,
    metric_value,
    packing_ok,
    score_groups,
    score_reference,
    score_task,
)


class ToySubjects(ToyTask):
    has_subjects = True


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(len(tokenizer), layers=2, seed=1)


def _max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("shots", [0, 2])
def test_packed_scores_equal_brute_force_per_choice(model, tokenizer, chat, shots):
    task = ToyTask()
    items = task.eval_items()
    reqs = [loglik_requests(task, x, task.exemplars(x, shots), tokenizer, chat) for x in items]
    groups = build_groups(tokenizer, reqs)
    assert len(groups) == len(items)  # one shared context per question
    packed = score_groups(model, groups, batch_size=4, pad_id=tokenizer.pad_token_id)
    ref = [score_reference(model, g) for g in groups]
    assert _max_diff(packed, ref) < 1e-4
    # brute force from scratch: the strings, scored token by token (trailing context whitespace
    # moves to the continuation, as lm-eval does)
    ctx, cont = reqs[0][2]
    n_ws = len(ctx) - len(ctx.rstrip())
    ctx, cont = ctx[: len(ctx) - n_ws], ctx[len(ctx) - n_ws :] + cont
    whole = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    brute = sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))
    assert packed[0][2] == pytest.approx(brute, abs=1e-4)
    assert packing_ok(model, groups[0], tokenizer.pad_token_id)


def test_groups_sharing_a_row_score_as_alone(model, tokenizer):
    """Several questions side by side in one row attend only within themselves."""
    from dskd.loglik import _score_packed

    task = ToyTask()
    groups = build_groups(tokenizer, [loglik_requests(task, x, [], tokenizer, False) for x in task.eval_items()])
    ref = [score_reference(model, g) for g in groups]
    n = len(groups)
    rows = [list(range(0, n, 2)), list(range(1, n, 2))]  # two rows of interleaved questions
    shared = _score_packed(model, groups, tokenizer.pad_token_id, 1 << 30, rows)
    assert _max_diff(shared, ref) < 1e-4


def test_packing_check_runs_once_per_model(model, tokenizer, monkeypatch):
    import dskd.loglik as E

    calls = []
    monkeypatch.setattr(E, "_PACKING_CHECKED", E.weakref.WeakKeyDictionary())
    monkeypatch.setattr(E, "_packing_check", lambda *a: calls.append(1) or True)
    g = build_groups(tokenizer, [loglik_requests(ToyTask(), ToyTask().eval_items()[0], [], tokenizer, False)])[0]
    assert E.packing_ok(model, g, 0) and E.packing_ok(model, g, 0)
    assert len(calls) == 1


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_places_every_group_once_within_the_row_length(seed):
    from dskd.loglik import plan_rows

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 80))).tolist()
    plan = plan_rows(lengths, batch_size=3)
    placed = [i for rows in plan for row in rows for i in row]
    assert sorted(placed) == list(range(len(lengths)))
    for rows in plan:
        assert 1 <= len(rows) <= 3
        cap = max(lengths[i] for row in rows for i in row)  # rows are as long as the batch's longest group
        assert all(sum(lengths[i] for i in row) <= cap for row in rows)
    # the longest group left opens each batch, so batches come longest first
    heads = [max(lengths[i] for row in rows for i in row) for rows in plan]
    assert heads == sorted(heads, reverse=True)
    # never more forward passes than one group per row
    assert len(plan) <= -(-len(lengths) // 3)


def test_batch_size_and_padding_do_not_change_scores(model, tokenizer):
    task = ToyTask()
    groups = build_groups(tokenizer, [loglik_requests(task, x, [], tokenizer, False) for x in task.eval_items()])
    a = score_groups(model, groups, batch_size=1, pad_id=tokenizer.pad_token_id)
    b = score_groups(model, groups, batch_size=6, pad_id=tokenizer.pad_token_id)
    assert _max_diff(a, b) < 1e-4


@pytest.mark.parametrize("scoring", ["loglik", "letter"])
@pytest.mark.parametrize("chat", [False, True])
def test_shared_exemplar_prefix_scores_equal_unshared(model, tokenizer, monkeypatch, scoring, chat):
    """Exemplars encoded once and their KV cache reused give every choice the same log-likelihood."""
    import dskd.loglik as E

    task = FixedShots()
    items = task.eval_items()  # questions and choices of different lengths: rows carry padding
    build = loglik_requests if scoring == "loglik" else letter_requests
    groups = build_groups(tokenizer, [build(task, x, task.exemplars(x, 4), tokenizer, chat) for x in items])
    keys = ["four shots"] * len(groups)
    clusters = E.shared_prefixes(groups, keys, 1 << 30)
    assert len(clusters) == 1 and clusters[0][1] == list(range(len(groups)))
    P = clusters[0][0]
    assert P >= E.MIN_SHARED_PREFIX and all(g.ctx[:P] == groups[0].ctx[:P] and len(g.ctx) > P for g in groups)
    encoded = []
    real_encode = E.encode_prefix
    monkeypatch.setattr(E, "encode_prefix", lambda m, ids: encoded.append(len(ids)) or real_encode(m, ids))
    monkeypatch.setattr(E, "_SHARING_CHECKED", E.weakref.WeakKeyDictionary())
    pad = tokenizer.pad_token_id
    for bs in (1, 4):
        shared = score_groups(model, groups, batch_size=bs, pad_id=pad, keys=keys)
        plain = score_groups(model, groups, batch_size=bs, pad_id=pad)
        assert _max_diff(shared, plain) < 1e-4
        assert _max_diff(shared, [score_reference(model, g) for g in groups]) < 1e-4
    assert encoded and set(encoded) == {P}  # the shared path ran (the self-check, then once per call)
    # score_task keys questions by their exemplars; the per-choice fallback agrees
    cfg = EvalConfig(tasks=["toy"], scoring=scoring, shots=4, chat=chat, batch_size=3, bootstrap=0)
    encoded.clear()
    fast = score_task(model, tokenizer, task, items, cfg, packed=True)["items"]["loglik"]
    assert encoded == [P]
    slow = score_task(model, tokenizer, task, items, cfg, packed=False)["items"]["loglik"]
    assert _max_diff(fast, slow) < 1e-4


def test_shared_prefixes_keeps_a_scored_token_and_skips_short_or_lone_prefixes(tokenizer):
    from dskd.loglik import Group, shared_prefixes

    a = Group(0, [0], list(range(40)), [[1]])
    b = Group(1, [0], list(range(30)) + [99, 98], [[1]])
    c = Group(2, [0], list(range(20)), [[1]])
    # the prefix stops one token short of the shortest context
    assert shared_prefixes([a, b, c], ["k"] * 3, 1 << 30) == [(19, [0, 1, 2])]
    assert shared_prefixes([a, b], ["k", "k"], 1 << 30) == [(30, [0, 1])]
    assert shared_prefixes([a, b], ["k", "j"], 1 << 30) == []  # one group per key: nothing to share
    assert shared_prefixes([a, b], [None, None], 1 << 30) == []  # 0-shot: never shared
    assert shared_prefixes([a, b], ["k", "k"], 35) == []  # a group the model would cut keeps the plain path
    assert shared_prefixes([a, b], ["k", "k"], 1 << 30, min_length=31) == []


def test_acc_and_acc_norm(model, tokenizer):
    task = ToyTask()
    items = task.eval_items()
    res = score_task(model, tokenizer, task, items, EvalConfig(tasks=["toy"], bootstrap=50), packed=True)
    rec = res["items"]
    for ll, x, p, pn in zip(rec["loglik"], items, rec["pred"], rec["pred_norm"], strict=True):
        assert p == int(np.argmax(ll))
        assert pn == int(np.argmax([s / len(c) for s, c in zip(ll, x.choices, strict=True)]))  # chars, as lm-eval
    gold = np.array(rec["gold"])
    assert res["metrics"]["acc"] == pytest.approx(np.mean(np.array(rec["pred"]) == gold))
    assert res["metrics"]["acc_norm"] == pytest.approx(np.mean(np.array(rec["pred_norm"]) == gold))
    assert res["metrics"]["acc_stderr"] >= 0 and res["n"] == len(items)


def test_letter_prompt_and_scoring(model, tokenizer):
    task = ToyTask()
    x = task.eval_items()[0]
    shots = task.exemplars(x, 1)
    raw = letter_prompt(task, x, shots, tokenizer, chat=False)
    assert raw.endswith("D. ice\nAnswer:") and f"Answer: {'ABCD'[shots[0].gold]}\n\n" in raw
    chat = letter_prompt(task, x, shots, tokenizer, chat=True)
    assert chat.endswith("<|im_start|>assistant\n") and "Answer with the letter" in chat
    # letter mode = the next-token log-probabilities of the letters at the answer position
    res = score_task(model, tokenizer, task, [x], EvalConfig(tasks=["toy"], scoring="letter", shots=1, bootstrap=0))
    groups = build_groups(tokenizer, [letter_requests(task, x, shots, tokenizer, False)])
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    letter_ids = [c[-1] for c in groups[0].conts]
    if all(len(c) == 1 for c in groups[0].conts):
        expect = [float(logp[i]) for i in letter_ids]
        assert res["items"]["loglik"][0] == pytest.approx(expect, abs=1e-4)
    assert res["items"]["pred"][0] == int(np.argmax(res["items"]["loglik"][0]))
    assert "acc_norm" not in res["metrics"]


def test_macro_average_over_subjects(model, tokenizer):
    task = ToySubjects()
    res = score_task(model, tokenizer, task, task.eval_items(), EvalConfig(tasks=["toy"], bootstrap=20))
    per = res["subjects"]
    assert set(per) == {"a", "b", "c"} and per["b"]["n"] == 3
    assert res["metrics"]["acc"] == pytest.approx(np.mean([per[s]["acc"] for s in per]))
    assert metric_value([1, 1, 0, 0, 0, 1], list("aabbbc")) == pytest.approx((1 + 0 + 1) / 3)


def test_bootstrap_stderr_matches_binomial():
    c = np.array([1.0] * 300 + [0.0] * 700)
    se = bootstrap_samples(c[None], n=2000, seed=0).std()
    assert se == pytest.approx(np.sqrt(0.3 * 0.7 / 1000), rel=0.1)


def test_evaluate_writes_results_and_cli(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "res" / "tiny.json"
    cfg = EvalConfig(tasks=["arc_easy"], limit=2, batch_size=8, bootstrap=20)
    res = evaluate(str(tiny_teacher_dir), cfg, out, progress=False)
    data = json.loads(out.read_text())
    assert data["complete"] and data["name"] == "tiny" and data["tasks"]["arc_easy"]["n"] == 2
    assert res["tasks"]["arc_easy"]["packed"] is True
    assert "| arc_easy | 2 |" in out.with_suffix(".md").read_text()
    # a run folder evaluates its exported student
    run = tmp_path / "run"
    run.mkdir()
    (run / "student").symlink_to(tiny_teacher_dir)
    rc = dskd_main(
        ["eval", "--model", str(run), "--eval.tasks", "piqa,csqa", "--eval.limit", "2", "--eval.scoring", "letter",
         "--eval.chat", "--eval.shots", "1", "--eval.bootstrap", "10", "--out", str(tmp_path / "cli.json")]
    )  # fmt: skip
    assert rc == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["model_path"].endswith("student") and cli["config"]["chat"] is True
    assert set(cli["tasks"]) == {"piqa", "csqa"}
    assert dskd_main(["eval", "--eval.tasks", "piqa", "--out", str(tmp_path / "x.txt")]) == 2
    assert dskd_main(["eval", "--eval.tasks", "pika", "--out", str(tmp_path / "x.json")]) == 2
    assert "did you mean piqa" in capsys.readouterr().err


@pytest.mark.slow
def test_packaged_smollm2_packed_matches_reference(packaged_model_dir):
    from dskd.models import load_model, load_tokenizer
    from dskd.tasks import get_task

    tok, model = load_tokenizer(str(packaged_model_dir)), load_model(str(packaged_model_dir))
    task = get_task("arc_challenge")
    items = task.eval_items()[:3]
    groups = build_groups(tok, [loglik_requests(task, x, [], tok, False) for x in items])
    packed = score_groups(model, groups, batch_size=4, pad_id=tok.pad_token_id)
    assert _max_diff(packed, [score_reference(model, g) for g in groups]) < 1e-3
