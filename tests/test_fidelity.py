"""Held-out fidelity (KL, agreement, perplexity with bootstrap errors) and the sense probe."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model
from fakes import FakeLexicon, FakeStore

from dskd import fidelity as F
from dskd.config import ConfigError, FidelityConfig


def _docs(tokenizer, n: int = 6) -> list[F.Doc]:
    texts = [
        "The red car and the blue bus.",
        "The opposite of hot is cold, and good is the opposite of bad.",
        "Prices rise and fall in the market of the city.",
        "A synonym of big is large; a small house is little.",
        "Which is heavy? The answer is a large train.",
        "The day was warm and the night was cool.",
    ][:n]
    return [F.Doc(f"d{i}", torch.tensor(tokenizer(t)["input_ids"])) for i, t in enumerate(texts)]


def test_teacher_against_itself_gives_zero_kl_and_full_agreement(tokenizer):
    teacher = make_model(len(tokenizer), seed=0)
    docs = _docs(tokenizer)
    # batch_tokens small enough to make several batches of mixed lengths (padding must not count)
    sums = F.measure(teacher, {"self": teacher}, docs, len(tokenizer), tokenizer.pad_token_id, batch_tokens=40)
    s = sums["self"]
    assert s["n"].sum() == sum(len(d.ids) for d in docs)
    assert s["n_tgt"].sum() == sum(len(d.ids) - 1 for d in docs)
    assert np.abs(s["kl"]).max() < 1e-6
    assert (s["agree"] == s["n"]).all()
    np.testing.assert_allclose(s["nll"], sums["teacher"]["nll"], rtol=1e-6)
    m = F.summarize(s, 200, 0)
    assert m["kl"] < 1e-6 and m["agree"] == 1.0 and m["ppl"] > 1


def test_perturbed_student_has_positive_kl_and_ppl_matches_a_plain_forward(tokenizer):
    teacher = make_model(len(tokenizer), seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers[-1].parameters():
            p.add_(0.5 * torch.randn_like(p))
    docs = _docs(tokenizer)
    sums = F.measure(teacher, {"s": student}, docs, len(tokenizer), tokenizer.pad_token_id, batch_tokens=64)
    m = F.summarize(sums["s"], 300, 0)
    assert m["kl"] > 1e-3 and m["kl_stderr"] > 0
    # reference: KL and NLL of document 0 from a plain unbatched forward
    ids = docs[0].ids[None]
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        ls = torch.log_softmax(student(input_ids=ids).logits[0].float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).sum().item()
    nll = -ls[:-1].gather(1, ids[0, 1:, None]).sum().item()
    assert sums["s"]["kl"][0] == pytest.approx(kl, rel=1e-4)
    assert sums["s"]["nll"][0] == pytest.approx(nll, rel=1e-4)
    total_nll = sums["s"]["nll"].sum() / sums["s"]["n_tgt"].sum()
    assert m["ppl"] == pytest.approx(math.exp(total_nll))


def test_probe_on_a_constructed_case_gives_the_known_rate():
    d = 8
    own = torch.zeros(2, d)
    own[1] = 1.0
    ant = torch.full((1, d), 5.0)
    store = FakeStore({10: own, 20: ant, 30: torch.full((1, d), -3.0)})
    lex = FakeLexicon.from_pairs([], [(10, 20)])
    probe = F.SenseProbe(store, lex)
    # 3 states near an own sense of 10, 1 near its antonym; 2 positions whose token has no antonym
    h = torch.stack([own[0] + 0.1, own[1] - 0.2, own[0], ant[0] - 0.3, torch.zeros(d), torch.zeros(d)])
    targets = torch.tensor([10, 10, 10, 10, 30, 99])
    app, hit = probe.hits(h, targets)
    assert app.tolist() == [True, True, True, True, False, False]
    assert hit.tolist() == [True, True, True, False, False, False]
    # token 20's antonym is 10: a state at 10's sense is a miss for target 20
    app, hit = probe.hits(own[:1], torch.tensor([20]))
    assert app.tolist() == [True] and hit.tolist() == [False]


def test_paired_diff_and_errors():
    rng = np.random.default_rng(0)
    a = {k: rng.random(30) + 0.5 for k in F.SUMS}
    d, lo, hi = F.paired_diff(a, a, "kl", 200, 0)
    assert d == 0 and lo == 0 and hi == 0
    b = dict(a, kl=a["kl"] + 0.2 * a["n"])  # +0.2 nats on every token
    d, lo, hi = F.paired_diff(b, a, "kl", 200, 0)
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)
    with pytest.raises(F.FidelityError, match="same documents"):
        F.paired_diff(a, {k: v[:5] for k, v in a.items()}, "kl")


def test_cli_end_to_end_with_probe(tmp_path, tiny_teacher_dir, tokenizer, capsys):
    """dskd eval --fidelity on held-out ARC text and prompts, a truncated student, a store and a lexicon."""
    from conftest import TOY_TEXT

    from dskd.__main__ import main
    from dskd.models import load_model, truncate

    student_dir = tmp_path / "run" / "student"
    truncate(load_model(str(tiny_teacher_dir)), 2).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TOY_TEXT)
    ant = tmp_path / "ant.txt"
    ant.write_text("hot cold\ngood bad\nbig small\nrise fall\nlight dark\nfast slow\n")
    lex, store = tmp_path / "lex", tmp_path / "store"
    assert (
        main(
            ["lexicon", "build", "--model.teacher", str(tiny_teacher_dir), "--lexicon.sources", f"pairs:{ant}:ant"]
            + ["--out", str(lex)]
        )
        == 0
    )
    argv = ["senses", "build", "--model.teacher", str(tiny_teacher_dir), "--senses.corpus", str(corpus)]
    argv += ["--out", str(store), "--senses.k", "2", "--senses.max_tokens", "1500", "--senses.seq_len", "64"]
    assert main([*argv, "--senses.key", "actual"]) == 0
    out = tmp_path / "fid.json"
    argv = [
        "fidelity",
        "--model.teacher",
        str(tiny_teacher_dir),
        "--students",
        f"{tmp_path / 'run'},self={tiny_teacher_dir}",
    ]
    argv += ["--baseline", "self", "--fidelity.text_limit", "5", "--fidelity.prompt_tasks", "arc_easy"]
    argv += ["--fidelity.prompt_limit", "3", "--fidelity.shots", "1", "--fidelity.bootstrap", "50"]
    argv += ["--senses_dir", str(store), "--lexicon_dir", str(lex)]
    assert main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and set(res["sets"]) == {"text", "prompts"}
    assert len(res["sets"]["text"]["docs"]) == 5 and len(res["sets"]["prompts"]["docs"]) == 3
    assert all(d.startswith("arc_easy:") for d in res["sets"]["prompts"]["docs"])
    for s in res["sets"].values():
        assert s["models"]["self"]["metrics"]["kl"] < 1e-6 and s["models"]["self"]["metrics"]["agree"] == 1.0
        assert s["models"]["run"]["metrics"]["kl"] > 0
        assert s["models"]["self"]["metrics"]["probe"] == s["models"]["teacher"]["metrics"]["probe"]
    assert sum(s["models"]["teacher"]["metrics"]["probe_positions"] for s in res["sets"].values()) > 0
    table = (tmp_path / "fid.md").read_text()
    assert "| teacher (reference) |" in table and "| run |" in table and "Δ" in table
    assert "**prompts**" in capsys.readouterr().out


def test_cli_errors(tmp_path, tiny_teacher_dir, capsys):
    from dskd.__main__ import main

    base = ["fidelity", "--model.teacher", str(tiny_teacher_dir), "--students", str(tiny_teacher_dir)]
    assert main([*base, "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main([*base, "--senses_dir", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "needs both" in capsys.readouterr().err
    assert main([*base, "--fidelity.text_tasks", "arc_esay", "--out", str(tmp_path / "x.json")]) == 2
    assert "arc_esay" in capsys.readouterr().err
    # the old spelling `dskd eval --fidelity` still runs `dskd fidelity`, with a note
    assert main(["eval", "--fidelity", *base[1:], "--out", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert "is now `dskd fidelity`" in err and "dskd fidelity: error: --out" in err
    with pytest.raises(Exception, match="fidelity.text_limit"):
        FidelityConfig(text_limit=-1)


def test_heldout_prompts_are_built_like_the_training_prompts(tokenizer):
    """Held-out prompts follow data.style: cloze prompts end where the answer text goes, letter ones
    where the letter goes, and both equal what the distillation data would build for the item."""
    from dskd.prompts import letter_prompt, loglik_requests
    from dskd.tasks import get_task

    task = get_task("arc_easy")
    item = task.eval_items()[0]
    ex = task.exemplars(item, 1, 0)
    for style, want in (
        ("cloze", loglik_requests(task, item, ex, tokenizer, False)[0][0]),
        ("letter", letter_prompt(task, item, ex, tokenizer, False)),
    ):
        (doc,) = F.heldout_prompts(tokenizer, ["arc_easy"], 1, 1, 0, 4096, chat=False, style=style)
        assert doc.ids.tolist() == tokenizer(want)["input_ids"], style
    cloze = tokenizer.decode(
        F.heldout_prompts(tokenizer, ["arc_easy"], 1, 1, 0, 4096, chat=False, style="cloze")[0].ids
    )
    letter = tokenizer.decode(F.heldout_prompts(tokenizer, ["arc_easy"], 1, 1, 0, 4096, chat=False)[0].ids)
    assert cloze != letter and cloze.rstrip().endswith("Answer:")
    with pytest.raises(ConfigError, match="--data.style"):
        F.heldout_prompts(tokenizer, ["arc_easy"], 1, 1, 0, 4096, chat=False, style="essay")


def test_students_are_loaded_one_at_a_time_with_the_numbers_of_one_pass(
    tmp_path, tiny_teacher_dir, tokenizer, monkeypatch
):
    """fidelity() keeps the teacher and ONE student in memory (issue 23: 10 students of an 8B recipe do not
    fit beside the teacher), and its sums equal measure() with every model at once, bit for bit."""
    import gc
    import weakref

    import dskd.models as M
    from dskd.models import load_model, truncate
    from dskd.prefix import PrefixMemo

    specs = {}
    for i, layers in enumerate((2, 3, 2)):
        d = tmp_path / f"s{i}"
        s = truncate(load_model(str(tiny_teacher_dir)), layers)
        with torch.no_grad():
            for p in s.model.layers[-1].parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        s.save_pretrained(d)
        tokenizer.save_pretrained(d)
        specs[f"s{i}"] = str(d)
    alive: list[weakref.ref] = []
    most = []
    real = M.load_model

    def counting(spec, *a, **k):
        gc.collect()
        most.append(sum(r() is not None for r in alive))  # models alive when another is loaded
        m = real(spec, *a, **k)
        alive.append(weakref.ref(m))
        return m

    monkeypatch.setattr(M, "load_model", counting)
    cfg = FidelityConfig(text_limit=5, prompt_limit=2, bootstrap=20, batch_tokens=48, probe=False)
    # the memo serves the students' shared bottom layer from the teacher's pass: it must not change a number
    res = F.fidelity(str(tiny_teacher_dir), specs, cfg, tmp_path / "f.json", prompt_tasks=["arc_easy"],
                     progress=False, memo=PrefixMemo(1))  # fmt: skip
    assert len(most) == 4 and max(most) <= 2  # the teacher, then each student beside it alone
    assert list(res["sets"]["text"]["models"]) == ["teacher", "s0", "s1", "s2"]
    assert list(res["fingerprints"]) == ["teacher", "s0", "s1", "s2"]
    # the reference: one measure() call with all models loaded together
    teacher = real(str(tiny_teacher_dir))
    models = {m: real(s) for m, s in specs.items()}
    for name, docs in (
        ("text", F.heldout_text(tokenizer, cfg.text_tasks, cfg.text_limit, cfg.max_length)),
        ("prompts", F.heldout_prompts(tokenizer, ["arc_easy"], cfg.prompt_limit, 0, 0, cfg.max_length)),
    ):
        ref = F.measure(teacher, models, docs, len(tokenizer), tokenizer.pad_token_id, cfg.batch_tokens)
        got = res["sets"][name]["models"]
        assert res["sets"][name]["docs"] == [d.id for d in docs]
        for m in ref:
            assert got[m]["sums"] == {k: v.tolist() for k, v in ref[m].items()}, (name, m)
    assert got["s0"]["metrics"]["kl"] > 0
