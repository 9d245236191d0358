"""The sense-term diagnostic (gradient ratio and cosine against KD + CE, the sense floor), the scale-free
sense weights (``loss.sense_scale``) and the answer gap of the report, on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TOY_TEXT
from fakes import FakeLexicon, FakeStore
from test_distill import ANT, SYN, make_cfg, metrics, trainable

from dskd import data as D
from dskd.config import ConfigError, LossConfig
from dskd.distill import distill
from dskd.losses import SensePlan, SenseTable, aux_and_main, grad_comparison, sense_loss
from dskd.sense_targets import build_sense_table, teacher_state_variance, variance_scale, window_plans


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n\n".join(TOY_TEXT[-2600:][i : i + 200] for i in range(0, 2600, 200)))
    return p


@pytest.fixture(scope="module")
def senses(tokenizer):
    """The fake sense store and relations of test_distill."""

    def tid(w):
        return tokenizer(w)["input_ids"][0]

    store = FakeStore.random(list(range(len(tokenizer))), 32, k=3, seed=1)
    lex = FakeLexicon.from_pairs([(tid(a), tid(b)) for a, b in SYN], [(tid(a), tid(b)) for a, b in ANT])
    return store, lex


# ----------------------------------------------------------------------------- pure functions


def test_grad_comparison_golden_and_invariants():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    a, m = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([2.0, 1.0, 0.0])
    # grads: aux -> (a, 3), main -> (m, 1)
    aux = (p * a).sum() + 3 * q.sum()
    main = (p * m).sum() + q.sum()
    d = grad_comparison(aux, main, [p, q])
    na, nm = math.sqrt(1 + 4 + 9), math.sqrt(4 + 1 + 1)
    assert d["aux_grad_norm"] == pytest.approx(na) and d["main_grad_norm"] == pytest.approx(nm)
    assert d["aux_grad_ratio"] == pytest.approx(na / nm)
    assert d["aux_grad_cos"] == pytest.approx((2 + 0 + 0 + 3) / (na * nm))
    assert p.grad is None and q.grad is None  # a copy: .grad is untouched
    # identical gradients: cosine 1, ratio 1; opposite: cosine -1
    d = grad_comparison((p * a).sum(), (p * a).sum(), [p])
    assert d["aux_grad_cos"] == pytest.approx(1.0) and d["aux_grad_ratio"] == pytest.approx(1.0)
    assert grad_comparison(-(p * a).sum(), (p * a).sum(), [p])["aux_grad_cos"] == pytest.approx(-1.0)
    # lambda = 0: ratio 0, cosine undefined
    cfg = LossConfig(lam=0.0)
    terms = {"ce": (p * m).sum(), "kd": (p * m).sum(), "sense": (p * a).sum()}
    aux, main = aux_and_main(terms, cfg)
    d = grad_comparison(aux, main, [p])
    assert d["aux_grad_ratio"] == 0.0 and math.isnan(d["aux_grad_cos"])
    # the parts add up to combine()'s total, with the configured weights
    cfg = LossConfig(lam=0.5, alpha=0.7, T=2.0, ce_weight=1.0)
    aux, main = aux_and_main(terms, cfg)
    assert aux.item() == pytest.approx(0.5 * terms["sense"].item())
    assert main.item() == pytest.approx(terms["ce"].item() + 0.7 * 4 * terms["kd"].item())


def _one_term_table(sense: torch.Tensor, antonym: torch.Tensor | None = None, margin: float = 0.0) -> SenseTable:
    bank = sense[None] if antonym is None else torch.stack([sense, antonym])
    return SenseTable(
        bank=bank,
        row_of=torch.tensor([-1, 0]),
        self_idx=torch.tensor([[0]]),
        pos_idx=torch.tensor([[0]]),
        neg_idx=torch.tensor([[1 if antonym is not None else -1]]),
        related=torch.tensor([True]),
        margin=margin,
    )


def test_sense_loss_variance_scale_golden():
    """sense_scale variance: each dimension's squared difference divided by its variance."""
    table = _one_term_table(torch.tensor([0.0, 0.0]))
    hs = torch.tensor([[[1.0, 2.0]]])
    labels = torch.tensor([[1]])
    plan = [SensePlan(related=torch.tensor([0]), self_=torch.zeros(0, dtype=torch.long))]
    plain = sense_loss(hs, hs, labels, plan, table, kappa=1).loss
    assert float(plain) == pytest.approx((1 + 4) / 2)
    scale = variance_scale(torch.tensor([1.0, 4.0], dtype=torch.float64))
    scaled = sense_loss(hs, hs, labels, plan, table, kappa=1, scale=scale).loss
    assert float(scaled) == pytest.approx((1 / 1 + 4 / 4) / 2)
    # a scale of ones is the plain loss; any scale equals scaling every vector beforehand
    assert float(sense_loss(hs, hs, labels, plan, table, kappa=1, scale=torch.ones(2)).loss) == float(plain)
    g = torch.Generator().manual_seed(0)
    bank, h_s, h_t = (
        torch.randn(6, 4, generator=g),
        torch.randn(1, 3, 4, generator=g),
        torch.randn(1, 3, 4, generator=g),
    )
    t = SenseTable(
        bank=bank,
        row_of=torch.tensor([-1, 0]),
        self_idx=torch.tensor([[0, 1]]),
        pos_idx=torch.tensor([[0, 1, 2, 3]]),
        neg_idx=torch.tensor([[4, 5]]),
        related=torch.tensor([True]),
        margin=1.5,
    )
    s = torch.tensor([0.5, 2.0, 1.0, 3.0])
    pl = [SensePlan(related=torch.tensor([0, 2]), self_=torch.tensor([1]))]
    lab = torch.tensor([[1, 1, 1]])
    a = sense_loss(h_s, h_t, lab, pl, t, kappa=2, scale=s).loss
    t2 = SenseTable(t.bank * s, t.row_of, t.self_idx, t.pos_idx, t.neg_idx, t.related, t.margin)
    b = sense_loss(h_s * s, h_t * s, lab, pl, t2, kappa=2).loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_positive_margin_stops_the_pull_at_the_teacher_distance():
    """loss.positive_margin: a positive within that MSE of the student's state is not pulled (0 loss, 0 grad)."""
    table = _one_term_table(torch.tensor([0.0, 0.0]))
    labels = torch.tensor([[1]])
    plan = [SensePlan(related=torch.tensor([0]), self_=torch.zeros(0, dtype=torch.long))]
    h = torch.tensor([[[1.0, 1.0]]], requires_grad=True)  # MSE 1 to the sense
    assert float(sense_loss(h, h, labels, plan, table, kappa=1, positive_margin=0.0).loss) == pytest.approx(1.0)
    out = sense_loss(h, h, labels, plan, table, kappa=1, positive_margin=1.5).loss
    out.backward()
    assert float(out) == 0.0 and float(h.grad.abs().sum()) == 0.0
    assert float(sense_loss(h, h, labels, plan, table, kappa=1, positive_margin=0.25).loss) == pytest.approx(0.75)


def test_teacher_positive_margin_stops_the_pull_where_the_teacher_is():
    """positive_margin_mode teacher: beta_p = MSE(p, h_t): no loss (and no floor) at the teacher's own state,
    MSE(p, h_s) - MSE(p, h_t) farther out, nothing closer in."""
    table = _one_term_table(torch.tensor([0.0, 0.0]))
    labels = torch.tensor([[1]])
    plan = [SensePlan(related=torch.tensor([0]), self_=torch.zeros(0, dtype=torch.long))]
    ht = torch.tensor([[[1.0, 1.0]]])  # MSE 1 to the sense
    assert float(sense_loss(ht, ht, labels, plan, table, kappa=1, teacher_margin=True).loss) == 0.0
    assert float(sense_loss(ht, ht, labels, plan, table, kappa=1).loss) == pytest.approx(1.0)  # the plain floor
    far = torch.tensor([[[2.0, 2.0]]], requires_grad=True)  # MSE 4
    out = sense_loss(far, ht, labels, plan, table, kappa=1, teacher_margin=True).loss
    assert float(out) == pytest.approx(4.0 - 1.0)
    out.backward()
    assert torch.allclose(far.grad, torch.tensor([[[2.0, 2.0]]]))  # d/dh of ||h||^2 / 2, as without a margin
    near = torch.tensor([[[0.5, 0.5]]])
    assert float(sense_loss(near, ht, labels, plan, table, kappa=1, teacher_margin=True).loss) == 0.0
    # plus the absolute positive_margin on top
    assert float(
        sense_loss(far, ht, labels, plan, table, kappa=1, positive_margin=0.5, teacher_margin=True).loss
    ) == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="--loss.positive_margin_mode"):
        LossConfig(positive_margin_mode="student")


def test_sense_scale_config_checks():
    with pytest.raises(ConfigError, match="--loss.sense_scale"):
        LossConfig(sense_scale="std")
    with pytest.raises(ConfigError, match="--loss.sense_share"):
        LossConfig(sense_share=0.0)
    with pytest.raises(ConfigError, match="--loss.lam"):
        LossConfig(sense_scale="grad_share", lam=0.0)
    with pytest.raises(ConfigError, match="--loss.sense_scale"):
        LossConfig(sense_scale="grad_share", hidden="mse", hidden_weight=1.0)
    with pytest.raises(ConfigError, match="--loss.margin_mode"):
        LossConfig(sense_scale="variance", margin_mode="state_median")
    assert LossConfig().sense_scale == "none"  # the paper's, by default


# ----------------------------------------------------------------------------- in training


def test_diagnostic_changes_no_result_and_reports_ratio_cosine_floor(tiny_teacher_dir, text_file, senses, tmp_path):
    """The diagnostic logs ratio/cosine at every logged step and the floor, and training is bit for bit the same
    without it."""
    from dskd.distill import export, fit, setup
    from dskd.models import load_model

    store, lex = senses
    cfg = make_cfg(tiny_teacher_dir, text_file, distill__teacher_cache=True, distill__log_every=2, distill__max_steps=4)
    outs = {}
    for on in (True, False):
        run = setup(cfg, tmp_path / f"diag{on}", store=store, lexicon=lex)
        run.diagnose = on
        assert fit(run, progress=False)
        export(run)
        outs[on] = run.out
    on, off = metrics(outs[True]), metrics(outs[False])
    assert [r["step"] for r in on] == [2, 4]
    for a, b in zip(on, off, strict=True):
        for k in ("loss", "ce", "kd", "sense", "grad_norm"):
            assert a[k] == b[k], k  # exactly equal
        assert "aux_grad_ratio" not in b
        assert a["aux_grad_ratio"] > 0 and -1 <= a["aux_grad_cos"] <= 1
    wa, wb = trainable(outs[True]), trainable(outs[False])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((outs[True] / "meta.json").read_text())
    dg = meta["diagnostics"]
    assert dg["aux_grad_ratio"]["last"] == on[-1]["aux_grad_ratio"] and dg["logged_steps"] == 2
    floor = dg["sense_floor"]["floor"]
    assert floor > 0 and on[0]["sense_above_floor"] == pytest.approx(on[0]["sense"] - floor)
    assert meta["senses"]["table"]["sense_floor"]["floor"] == floor
    # the floor is the sense loss with the student's state replaced by the teacher's, at the same positions
    data = D.TeacherCache.open(meta["teacher_cache"]["path"]).data
    table = build_sense_table(store, lex, sorted({int(t) for s in data.seqs for t in s[1:].tolist()}), cfg.loss)
    table.margin = meta["senses"]["table"]["margin"]
    teacher = load_model(str(tiny_teacher_dir))
    total = terms = 0
    order = [i for mb in D.epoch_batches(len(data), 1, cfg.distill.seed, 0) for i in mb][
        : cfg.loss.margin_calibration_seqs
    ]
    for i in order:
        plan = window_plans(data, [i], table, cfg.loss, cfg.distill.seed, 0, 0)[i]
        batch = D.collate([data.seqs[i]], 0)
        with torch.no_grad():
            ht = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        total += float(sense_loss(ht, ht, batch["labels"], [plan], table, cfg.loss.kappa, num_terms=1.0).loss)
        terms += plan.n_terms
    assert floor == pytest.approx(total / terms, rel=1e-3)  # the cache keeps float16 states


def test_diagnostic_for_the_hidden_state_loss(tiny_teacher_dir, text_file, tmp_path):
    cfg = make_cfg(
        tiny_teacher_dir, text_file, loss__lam=0.0, loss__hidden="mse", loss__hidden_weight=1.0, distill__max_steps=2
    )
    rows = metrics(distill(cfg, tmp_path / "h", progress=False))
    assert all(r["aux_grad_ratio"] > 0 and "sense_above_floor" not in r for r in rows)
    kd = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=1)
    assert "aux_grad_ratio" not in metrics(distill(kd, tmp_path / "kd", progress=False))[0]


def test_grad_share_sets_lambda_once_after_warmup(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    share = 0.25
    cfg = make_cfg(
        tiny_teacher_dir,
        text_file,
        loss__sense_scale="grad_share",
        loss__sense_share=share,
        distill__warmup_frac=0.4,
        distill__max_steps=5,
    )
    run = distill(cfg, tmp_path / "gs", store=store, lexicon=lex, progress=False)
    rows = metrics(run)
    info = json.loads((run / "meta.json").read_text())["sense_scale"]
    assert info["mode"] == "grad_share" and info["share"] == share and info["step"] == 3  # int(0.4 * 5) = 2 warm-up
    assert [r["lam"] for r in rows[:2]] == [1.0, 1.0]
    assert all(r["lam"] == info["lam"] for r in rows[2:]) and info["lam"] != 1.0
    # at the step it was set, the lambda-weighted sense gradient is `share` times KD + CE's
    assert rows[2]["aux_grad_ratio"] == pytest.approx(share, rel=1e-6)
    assert info["lam"] == pytest.approx(share / info["measured_ratio"])


def test_variance_scale_uses_the_teacher_state_variance(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__sense_scale="variance", distill__max_steps=2)
    run = distill(cfg, tmp_path / "v", store=store, lexicon=lex, progress=False)
    info = json.loads((run / "meta.json").read_text())["sense_scale"]
    assert info["mode"] == "variance" and info["mean_variance"] > 0
    plain_cfg = make_cfg(tiny_teacher_dir, text_file, distill__max_steps=2)
    plain = distill(plain_cfg, tmp_path / "p", store=store, lexicon=lex, progress=False)
    assert metrics(run)[0]["sense"] != metrics(plain)[0]["sense"]
    # the variance: of the teacher's states at the target positions of the first sequences (independently)
    from dskd.models import load_model

    teacher = load_model(str(tiny_teacher_dir))

    class Data:
        def __init__(self, seqs):
            self.seqs = seqs

        def __len__(self):
            return len(self.seqs)

    g = torch.Generator().manual_seed(0)
    toy = Data([torch.randint(5, 100, (n,), generator=g) for n in (7, 9, 5)])

    def states(idx, batch):
        with torch.no_grad():
            return teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]

    var = teacher_state_variance(toy, LossConfig(margin_calibration_seqs=3), 0, 0, states)
    allh = []
    for s in toy.seqs:
        b = D.collate([s], 0)
        allh.append(states(None, b)[0][b["labels"][0] != -100])
    ref = torch.cat(allh).double().var(0, unbiased=False)
    assert torch.allclose(var, ref, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- report and figure


def _gap_result(path, name, ll, gold, task="arc_easy"):
    items = {"id": [f"q{i}" for i in range(len(gold))], "gold": gold, "pred": [0] * len(gold), "loglik": ll}
    data = {
        "format": {"name": "dskd-eval", "version": 1},
        "name": name,
        "model": f"models/{name}",
        "complete": True,
        "tasks": {task: {"n": len(gold), "metrics": {"acc": 0.5}, "items": items}},
    }
    path.write_text(json.dumps(data))
    return path


def test_answer_gap_golden_and_paired_against_the_baseline(tmp_path):
    from dskd.report import answer_gap_section, answer_gaps, paired_bootstrap

    e = {"items": {"id": ["a", "b"], "gold": [0, 1], "loglik": [[-1.0, -3.0, -2.0], [-1.0, -3.0, -2.0]]}}
    assert answer_gaps(e) == {"a": 1.0, "b": -2.0}  # -1 - (-2); -3 - (-1)
    assert answer_gaps({"items": {"id": ["a"], "gold": [0], "pred": [0]}}) == {}  # no log-likelihoods: none
    g = np.random.default_rng(0)
    gold = [0] * 50
    base_ll = g.normal(size=(50, 4)).tolist()
    better_ll = [[r[0] + 0.5, *r[1:]] for r in base_ll]  # the gold choice 0.5 nats more likely everywhere
    kd = _gap_result(tmp_path / "kd.json", "kd", base_ll, gold)
    dskd = _gap_result(tmp_path / "dskd.json", "dskd", better_ll, gold)
    text = answer_gap_section([kd, dskd], baseline="kd", n_boot=500)
    a = np.array(
        [answer_gaps({"items": {"id": list(range(50)), "gold": gold, "loglik": better_ll}})[i] for i in range(50)]
    )
    b = np.array(
        [answer_gaps({"items": {"id": list(range(50)), "gold": gold, "loglik": base_ll}})[i] for i in range(50)]
    )
    d, lo, hi = paired_bootstrap(a, b, None, 500, 0)
    assert d == pytest.approx(0.5)
    assert f"| dskd | {a.mean():.3f} Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}]*" in text
    assert f"| kd | {b.mean():.3f} | {b.mean():.3f} |" in text


def test_diagnostics_figure_and_report_section(tmp_path):
    from dskd.plots import plot_diagnostics
    from dskd.report import training_diagnostics_section

    run = tmp_path / "dskd"
    run.mkdir()
    rows = [
        {"step": 5, "sense": 3.0, "sense_above_floor": 0.7, "aux_grad_ratio": 1.2, "aux_grad_cos": -0.1},
        {"step": 10, "sense": 2.8, "sense_above_floor": 0.5, "aux_grad_ratio": 1.5, "aux_grad_cos": 0.2},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kd = tmp_path / "kd"
    kd.mkdir()
    (kd / "metrics.jsonl").write_text(json.dumps({"step": 5, "kd": 1.0}) + "\n")
    assert plot_diagnostics({"kd": kd}, tmp_path / "none.png") is None
    png = plot_diagnostics({"kd": kd, "dskd": run}, tmp_path / "d.png")
    assert png is not None and png.stat().st_size > 0
    meta = {
        "loss": {"lam": 1.0},
        "sense_scale": {"mode": "none"},
        "diagnostics": {
            "sense_floor": {"floor": 2.3},
            "sense_above_floor": {"first": 0.7, "last": 0.5},
            "aux_grad_ratio": {"first": 1.2, "mean": 1.35, "last": 1.5},
            "aux_grad_cos": {"first": -0.1, "mean": 0.05, "last": 0.2},
        },
    }
    (run / "meta.json").write_text(json.dumps(meta))
    (kd / "meta.json").write_text(json.dumps({"diagnostics": {"logged_steps": 1}}))
    text = training_diagnostics_section({"kd": kd, "dskd": run})
    assert "| dskd | none | 1 | 2.3 | 0.7 → 0.5 | 1.2 / 1.35 / 1.5 | -0.10 / +0.05 / +0.20 |" in text
    assert "| kd |" not in text
    assert training_diagnostics_section({"kd": kd}) == ""


def test_grad_share_lambda_survives_a_resume(tiny_teacher_dir, text_file, senses, tmp_path):
    """A run killed after lambda was set resumes with that lambda and ends where an uninterrupted run does."""
    store, lex = senses
    kw = {"store": store, "lexicon": lex, "progress": False}
    over = {"loss__sense_scale": "grad_share", "distill__warmup_frac": 0.25, "distill__max_steps": 4}
    cfg = make_cfg(tiny_teacher_dir, text_file, distill__save_every=1, **over)
    whole = distill(cfg, tmp_path / "whole", **kw)
    part = distill(cfg, tmp_path / "part", stop_after=2, **kw)
    assert not (part / "meta.json").is_file()
    distill(cfg, part, resume=True, **kw)
    a, b = metrics(whole), metrics(part)
    assert [r["lam"] for r in a] == [r["lam"] for r in b] and a[0]["lam"] == 1.0 and a[1]["lam"] != 1.0
    wa, wb = trainable(whole), trainable(part)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    meta = json.loads((part / "meta.json").read_text())["sense_scale"]
    assert meta["lam"] == a[-1]["lam"] and meta["step"] == 2


def test_teacher_positive_margin_floor_has_no_positive_part(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    floors = {}
    for mode in ("absolute", "teacher"):
        cfg = make_cfg(tiny_teacher_dir, text_file, loss__positive_margin_mode=mode, distill__max_steps=1)
        run = distill(cfg, tmp_path / mode, store=store, lexicon=lex, progress=False)
        floors[mode] = json.loads((run / "meta.json").read_text())["diagnostics"]["sense_floor"]["floor"]
    # the plain floor is mostly the positives' MSE; with the teacher margin only antonym hinge terms remain
    assert 0 <= floors["teacher"] < 0.5 * floors["absolute"]
