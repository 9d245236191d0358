"""Golden values, identities and reference implementations of every loss in dskd.losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeLexicon, FakeStore

from dskd.config import ConfigError, LossConfig
from dskd.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    SensePlan,
    antonym_teacher_mse,
    ce_loss,
    combine,
    divergence,
    hidden_loss,
    kd_loss,
    plan_positions,
    sense_loss,
    sparse_teacher,
    summarize_sense_stats,
)
from dskd.sense_targets import build_sense_table

P = torch.tensor([0.75, 0.25]).log()
Q = torch.tensor([0.5, 0.5]).log()
LN = math.log

# hand-computed from the definitions, p = (3/4, 1/4), q = (1/2, 1/2)
GOLDEN = {
    "forward_kl": 0.75 * LN(1.5) + 0.25 * LN(0.5),  # 0.130812
    "reverse_kl": 0.5 * LN(0.5 / 0.75) + 0.5 * LN(2.0),  # 0.143841
    # m = (0.625, 0.375)
    "jsd": 0.5 * (0.75 * LN(0.75 / 0.625) + 0.25 * LN(0.25 / 0.375))
    + 0.5 * (0.5 * LN(0.5 / 0.625) + 0.5 * LN(0.5 / 0.375)),  # 0.033822
    # m = 0.1 p + 0.9 q = (0.525, 0.475)
    "skew_forward_kl": 0.75 * LN(0.75 / 0.525) + 0.25 * LN(0.25 / 0.475),  # 0.107043
    # m = 0.1 q + 0.9 p = (0.725, 0.275)
    "skew_reverse_kl": 0.5 * LN(0.5 / 0.725) + 0.5 * LN(0.5 / 0.275),  # 0.113137
    "tv": 0.25,
}


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_golden(kind):
    got = divergence(P, Q, kind, beta=0.5, skew=0.1)
    assert got.item() == pytest.approx(GOLDEN[kind], abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_of_identical_distributions_is_zero(kind):
    logp = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.allclose(divergence(logp, logp, kind), torch.zeros(5), atol=1e-6)


def test_kl_matches_torch_reference():
    t, s = torch.randn(7, 13), torch.randn(7, 13)
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    ref = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(divergence(lp, lq, "forward_kl"), ref, atol=1e-6)
    ref_r = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(divergence(lp, lq, "reverse_kl"), ref_r, atol=1e-6)


def test_jsd_limits():
    lp, lq = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    fkl, rkl = divergence(lp, lq, "forward_kl"), divergence(lp, lq, "reverse_kl")
    # endpoints are the normalised limits (GKD): JSD(beta)/beta -> KL(p||q), JSD(beta)/(1-beta) -> KL(q||p)
    assert torch.allclose(divergence(lp, lq, "jsd", beta=0.0), fkl)
    assert torch.allclose(divergence(lp, lq, "jsd", beta=1.0), rkl)
    eps = 1e-3
    assert torch.allclose(divergence(lp, lq, "jsd", beta=eps) / eps, fkl, rtol=2e-2, atol=1e-4)
    assert torch.allclose(divergence(lp, lq, "jsd", beta=1 - eps) / eps, rkl, rtol=2e-2, atol=1e-4)
    # symmetric at beta = 0.5
    assert torch.allclose(divergence(lp, lq, "jsd", beta=0.5), divergence(lq, lp, "jsd", beta=0.5), atol=1e-6)


def test_skew_limits():
    lp, lq = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    assert torch.allclose(divergence(lp, lq, "skew_forward_kl", skew=0.0), divergence(lp, lq, "forward_kl"))
    assert torch.allclose(divergence(lp, lq, "skew_reverse_kl", skew=0.0), divergence(lp, lq, "reverse_kl"))
    assert torch.allclose(divergence(lp, lq, "skew_forward_kl", skew=1.0), torch.zeros(4), atol=1e-6)
    assert torch.allclose(divergence(lp, lq, "skew_reverse_kl", skew=1.0), torch.zeros(4), atol=1e-6)


def test_ce_golden_and_masking():
    logits = torch.tensor([[[0.0, 0.0], [LN(3.0), 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    expected = (LN(2.0) + LN(4.0)) / 2  # -log 1/2, -log 1/4
    assert ce_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # a caller-provided count divides the sum (the window's token count)
    assert ce_loss(logits, labels, num_tokens=4).item() == pytest.approx(2 * expected / 4, abs=1e-6)
    ref = F.cross_entropy(logits.view(-1, 2), labels.view(-1), ignore_index=IGNORE_INDEX)
    assert ce_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)


def test_kd_golden_with_temperature():
    student = torch.zeros(1, 2, 2)
    teacher = torch.tensor([[[2 * LN(3.0), 0.0], [2 * LN(3.0), 0.0]]])  # softmax(z / 2) = (3/4, 1/4)
    labels = torch.tensor([[1, IGNORE_INDEX]])
    got = kd_loss(student, teacher, labels, "forward_kl", T=2.0)
    assert got.item() == pytest.approx(GOLDEN["forward_kl"], abs=1e-6)
    assert combine({"kd": got, "ce": torch.tensor(0.0)}, LossConfig(alpha=0.7, T=2.0)).item() == pytest.approx(
        0.7 * 4 * GOLDEN["forward_kl"], abs=1e-6
    )


@pytest.mark.parametrize("fn", ["ce", "kd", "hidden", "sense"])
def test_all_masked_gives_zero_not_nan(fn):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    h = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    if fn == "ce":
        out = ce_loss(logits, labels)
    elif fn == "kd":
        out = kd_loss(logits, torch.randn(2, 3, 5), labels)
    elif fn == "hidden":
        out = hidden_loss(h, torch.randn(2, 3, 4), labels)
    else:
        store = FakeStore.random([1, 2], 4)
        table = build_sense_table(store, FakeLexicon({}, {}), [1, 2], LossConfig())
        empty = SensePlan(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        out = sense_loss(h, h.detach(), labels, [empty, empty], table).loss
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()  # the graph stays usable (DDP needs every parameter to get a gradient)


def test_sparse_teacher_bucket_golden_and_full_k_equals_dense():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    t_logits, s_logits = p.log().view(1, 1, 3), q.log().view(1, 1, 3)
    labels = torch.tensor([[0]])
    sp = sparse_teacher(t_logits, k=1, T=1.0)
    # buckets: teacher (0.5, 0.5), student (0.2, 0.8)
    expected = 0.5 * LN(0.5 / 0.2) + 0.5 * LN(0.5 / 0.8)
    assert kd_loss(s_logits, sp, labels, T=1.0).item() == pytest.approx(expected, abs=1e-6)
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    lab = torch.randint(0, 7, (2, 5))
    lab[1, 3:] = IGNORE_INDEX
    for kind in DIVERGENCES:
        dense = kd_loss(s, t, lab, kind, T=2.0)
        full = kd_loss(s, sparse_teacher(t, 7, 2.0), lab, kind, T=2.0)
        assert full.item() == pytest.approx(dense.item(), abs=1e-5), kind
        # lumping the tail never increases an f-divergence
        if kind != "tv":
            assert kd_loss(s, sparse_teacher(t, 3, 2.0), lab, kind, T=2.0).item() <= dense.item() + 1e-6


def test_hidden_loss_golden():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([[3, 4]])
    assert hidden_loss(s, t, labels, "mse").item() == pytest.approx((0.5 + 0.5) / 2)
    s2 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t2 = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    assert hidden_loss(s2, t2, labels, "cosine").item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    assert hidden_loss(t, t, labels, "mse").item() == 0.0


# ----------------------------------------------------------------------------- the sense loss

Y, SYN, ANT = 5, 7, 9


def _hand_table(**loss_kw):
    """d = 2. y = 5 has senses (0,0), (10,10); its synonym 7 has (1,0); its antonym 9 has (0,1), (5,5)."""
    store = FakeStore(
        {
            Y: torch.tensor([[0.0, 0.0], [10.0, 10.0]]),
            SYN: torch.tensor([[1.0, 0.0]]),
            ANT: torch.tensor([[0.0, 1.0], [5.0, 5.0]]),
        }
    )
    lex = FakeLexicon({Y: [(SYN,)]}, {Y: [(ANT,)]})
    cfg = LossConfig(**{"margin": 3.0, **loss_kw})
    return build_sense_table(store, lex, [Y, 3], cfg), cfg


def _one_position(table, cfg, kind="related"):
    hs = torch.tensor([[[2.0, 0.0]]], requires_grad=True)  # student state
    ht = torch.tensor([[[0.4, 0.1]]])  # teacher state: nearest positive (0,0), nearest negative (0,1)
    labels = torch.tensor([[Y]])
    pos = torch.tensor([0])
    none = torch.zeros(0, dtype=torch.long)
    plan = SensePlan(pos, none) if kind == "related" else SensePlan(none, pos)
    return sense_loss(hs, ht, labels, [plan], table, kappa=cfg.kappa, positive_margin=cfg.positive_margin), hs


def test_sense_loss_selects_by_teacher_state_kappa_1():
    table, cfg = _hand_table(kappa=1)
    out, hs = _one_position(table, cfg)
    # P -> (0,0): MSE((0,0),(2,0)) = 4/2 = 2 (by the student state it would be (1,0), MSE 0.5)
    # N -> (0,1): MSE = (4 + 1)/2 = 2.5, hinge max(0, 3 - 2.5) = 0.5
    assert out.loss.item() == pytest.approx(2.5)
    s = summarize_sense_stats({k: float(v) for k, v in out.stats.items()})
    assert s["pos_mse"] == pytest.approx(2.0) and s["neg_mse"] == pytest.approx(2.5)
    assert s["hinge_active_share"] == 1.0 and s["sense_terms"] == 1
    out.loss.backward()
    # d/dh [||h - p||^2 / d] = 2 (h - p) / d = (2, 0); d/dh [3 - ||h - n||^2 / d] = -(h - n) = (-2, 1)
    assert torch.allclose(hs.grad[0, 0], torch.tensor([0.0, 1.0]))


def test_sense_loss_kappa_2_and_margins():
    table, cfg = _hand_table(kappa=2)
    out, _ = _one_position(table, cfg)
    # P -> (0,0), (1,0): MSE 2, 0.5 -> mean 1.25; N -> (0,1), (5,5): MSE 2.5, 17 -> hinges 0.5, 0 -> 0.25
    assert out.loss.item() == pytest.approx(1.5)
    assert summarize_sense_stats({k: float(v) for k, v in out.stats.items()})["hinge_active_share"] == 0.5
    table, cfg = _hand_table(kappa=2, positive_margin=1.0)
    assert _one_position(table, cfg)[0].loss.item() == pytest.approx(0.5 + 0.25)  # relu(2-1), relu(0.5-1)


def test_self_sense_term_uses_own_senses_only():
    table, cfg = _hand_table(kappa=1)
    out, _ = _one_position(table, cfg, kind="self")
    assert out.loss.item() == pytest.approx(2.0)  # (0,0) nearest to the teacher, no negatives
    assert out.stats["neg_n"].item() == 0


def test_reference_antonyms_and_ablation_switches():
    table, cfg = _hand_table(kappa=1, reference_antonyms=True)
    # N now also holds y's own senses; nearest to the teacher is (0,0): hinge max(0, 3 - 2) = 1
    assert _one_position(table, cfg)[0].loss.item() == pytest.approx(2.0 + 1.0)
    table, cfg = _hand_table(kappa=2, use_synonyms=False)
    # P = own senses only -> (0,0), (10,10) : MSE 2, (64 + 100)/2 = 82 -> 42; N as before -> 0.25
    assert _one_position(table, cfg)[0].loss.item() == pytest.approx(42.0 + 0.25)
    table, cfg = _hand_table(kappa=2, use_antonyms=False)
    assert _one_position(table, cfg)[0].loss.item() == pytest.approx(1.25)
    table, _ = _hand_table(use_synonyms=False, use_antonyms=False)
    assert not table.related.any()


def test_state_median_margin_scales_by_store_median():
    table, _ = _hand_table(margin=0.5, margin_mode="state_median")
    assert table.margin == pytest.approx(0.5 * 3.5)
    assert table.info["store_median_mse"] == 3.5
    assert LossConfig(margin_mode="relative").margin_mode == "state_median"  # the old name still reads
    table, _ = _hand_table(margin=0.5, margin_mode="absolute")
    assert table.margin == 0.5 and table.info["margin_calibrated"]
    with pytest.raises(ConfigError, match="loss.margin_quantile"):
        LossConfig(margin_quantile=1.0)
    with pytest.raises(ConfigError, match="loss.margin_mode"):
        LossConfig(margin_mode="median")


def test_antonym_teacher_mse_golden():
    """MSE of the kept antonym senses to the teacher state (0.4, 0.1): (0,1) -> 0.485, (5,5) -> 22.585."""
    table, _ = _hand_table()
    ht, labels = torch.tensor([[[0.4, 0.1]]]), torch.tensor([[Y]])
    none = torch.zeros(0, dtype=torch.long)
    related = SensePlan(torch.tensor([0]), none)
    got = antonym_teacher_mse(ht, labels, [related], table, kappa=2)
    assert sorted(got.tolist()) == pytest.approx([0.485, 22.585])
    assert antonym_teacher_mse(ht, labels, [related], table, kappa=1).tolist() == pytest.approx([0.485])
    assert antonym_teacher_mse(ht, labels, [SensePlan(none, torch.tensor([0]))], table).numel() == 0
    # with the reference code's negatives, y's own senses join: (0,0) -> 0.085 is now nearest
    table, _ = _hand_table(reference_antonyms=True)
    assert sorted(antonym_teacher_mse(ht, labels, [related], table, kappa=2).tolist()) == pytest.approx([0.085, 0.485])
    # the hinge at the teacher's own state is active exactly for the terms below the margin
    table, cfg = _hand_table(kappa=2, margin=1.0)
    out = sense_loss(ht, ht, labels, [related], table, kappa=2)
    assert out.stats["hinge_active"].item() == 1 and out.stats["neg_n"].item() == 2


def test_multi_token_tail_uses_composed_entry_and_caps():
    store = FakeStore({1: torch.ones(2, 3), 100: torch.zeros(1, 3)}, spans={(2, 3): 100})
    syn = {1: [(2, 3), (4,)] + [(i,) for i in range(10, 40)]}  # (4,) and 10.. have no senses
    table = build_sense_table(store, FakeLexicon(syn, {}), [1], LossConfig(max_synonyms=25))
    assert table.info["bank_rows"] == 3 and table.pos_idx.shape == (1, 3) and bool(table.related[0])
    many = FakeStore({i: torch.ones(1, 3) * i for i in range(1, 60)})
    lex = FakeLexicon({1: [(i,) for i in range(2, 60)]}, {1: [(i,) for i in range(2, 60)]})
    t = build_sense_table(many, lex, [1], LossConfig(max_synonyms=25, max_antonyms=4))
    assert (t.pos_idx[0] >= 0).sum() == 1 + 25 and (t.neg_idx[0] >= 0).sum() == 4
    assert torch.equal(t.pos_idx, build_sense_table(many, lex, [1], LossConfig(max_antonyms=4)).pos_idx)  # seeded


@pytest.mark.parametrize(("n_related", "expected"), [(0, 0), (10, 10), (40, 25), (100, 40)])
def test_position_sampling_rule(n_related, expected):
    store = FakeStore({Y: torch.ones(2, 2), 6: torch.ones(1, 2), SYN: torch.ones(1, 2)})
    table = build_sense_table(store, FakeLexicon({Y: [(SYN,)]}, {}), [Y, 6], LossConfig())
    # n_related positions with target y (related), 150 with token 6 (senses, no relation), 3 masked
    labels = torch.tensor([Y] * n_related + [6] * 150 + [IGNORE_INDEX] * 3)
    plan = plan_positions(labels, table, 25, 0.4, True, torch.Generator().manual_seed(0))
    assert plan.related.numel() == expected and plan.self_.numel() == expected
    assert (labels[plan.related] == Y).all() and (labels[plan.self_] != IGNORE_INDEX).all()
    assert len(set(plan.related.tolist())) == expected  # without replacement
    off = plan_positions(labels, table, 25, 0.4, False, torch.Generator().manual_seed(0))
    assert off.self_.numel() == 0


def test_sense_loss_sum_then_divide_over_micro_batches():
    """Two half-batches normalised by the window's term count add up to the whole batch's loss."""
    torch.manual_seed(0)
    store = FakeStore.random(list(range(10)), 4, k=3)
    lex = FakeLexicon.from_pairs([(1, 2), (3, 4)], [(1, 5), (2, 6)])
    table = build_sense_table(store, lex, list(range(10)), LossConfig(kappa=2, margin=5.0))
    labels = torch.randint(0, 10, (4, 12))
    hs, ht = torch.randn(4, 12, 4), torch.randn(4, 12, 4)
    plans = [plan_positions(labels[i], table, 3, 0.4, True, torch.Generator().manual_seed(i)) for i in range(4)]
    n = sum(p.n_terms for p in plans)
    whole = sense_loss(hs, ht, labels, plans, table, 2).loss
    halves = sum(
        sense_loss(hs[i : i + 2], ht[i : i + 2], labels[i : i + 2], plans[i : i + 2], table, 2, 0.0, n).loss
        for i in (0, 2)
    )
    assert whole.item() == pytest.approx(halves.item(), rel=1e-6)
