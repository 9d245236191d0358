"""Sense dictionary: reservoir, k-means, composition, store, resume, CLI (tiny models only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOY_TEXT, make_model

from dskd import senses as S
from dskd.config import SenseConfig


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TOY_TEXT)
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in TOY_TEXT.split(". ")[:200]))
    return d


def _cfg(corpus: Path, **kw) -> SenseConfig:
    base = dict(corpus=[str(corpus)], k=3, max_samples=40, max_tokens=2500, seq_len=64, batch_size=4, seed=0)
    base.update(kw)
    return SenseConfig(**base)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory, tiny_teacher_dir, toy_corpus) -> Path:
    out = tmp_path_factory.mktemp("stores") / "toy"
    return S.build_senses(str(tiny_teacher_dir), _cfg(toy_corpus, key="actual"), None, out, progress=False)


# ------------------------------------------------------------------------------------------ reservoir


def _reference_reservoir(ids: torch.Tensor, states: torch.Tensor, cap: int, seed: int, batch: int):
    """Sequential Algorithm R consuming the same draws as Reservoir.add (one per state, stream order)."""
    gen = torch.Generator().manual_seed(seed)
    seen: dict[int, int] = {}
    slots: dict[tuple[int, int], float] = {}
    for a in range(0, len(ids), batch):
        u = torch.rand(min(batch, len(ids) - a), generator=gen, dtype=torch.float64)
        for k in range(len(u)):
            t = int(ids[a + k])
            j = seen.get(t, 0) + 1
            seen[t] = j
            slot = j - 1 if j <= cap else int(np.floor(float(u[k]) * j))
            if slot < cap:
                slots[(t, slot)] = float(states[a + k, 0])
    return slots


def test_reservoir_matches_sequential_algorithm_r():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (3000,), generator=g)
    ids[1000:1400] = 2  # long runs: many states of one token land in one batch
    states = torch.arange(3000, dtype=torch.float32)[:, None]
    res = S.Reservoir.empty(5, 1, cap=7, seed=3)
    for a in range(0, 3000, 256):
        res.add(ids[a : a + 256], states[a : a + 256])
    ref = _reference_reservoir(ids, states, 7, 3, 256)
    got = {(int(k) // 7, int(k) % 7): float(res.pool[r, 0]) for k, r in zip(res.keys, res.rows, strict=True)}
    assert got == ref
    assert res.seen.tolist() == torch.bincount(ids, minlength=5).tolist()


def test_reservoir_is_uniform():
    """2,000 tokens (independent trials) each offered 100 states; each state must be kept w.p. cap/100."""
    from scipy.stats import chisquare

    n_tok, n_occ, cap = 2000, 100, 10
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randperm(n_tok, generator=g) for _ in range(n_occ)])
    states = torch.arange(n_occ).repeat_interleave(n_tok).float()[:, None]  # state = occurrence index
    res = S.Reservoir.empty(n_tok, 1, cap=cap, seed=0)
    a = 0
    for size in [1, 7, 500, 3001, 12345] * 100:  # mixed batch sizes
        if a >= len(ids):
            break
        res.add(ids[a : a + size], states[a : a + size])
        a += size
    tokens, samples = res.samples()
    assert torch.bincount(tokens, minlength=n_tok).eq(cap).all()
    freq = torch.bincount(samples[:, 0].long(), minlength=n_occ).numpy()
    assert chisquare(freq).pvalue > 1e-3
    assert freq[:cap].sum() < 1.3 * cap * n_tok * cap / n_occ  # early states are not over-kept


# -------------------------------------------------------------------------------------------- k-means


def test_kmeans_matches_sklearn_and_is_deterministic():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    groups, sizes = [], [300, 180, 120, 60, 45, 4, 2]
    for n in sizes:
        centres = torch.randn(4, 16, generator=g) * 3
        groups.append(centres[torch.randint(0, 4, (n,), generator=g)] + torch.randn(n, 16, generator=g))
    x, sz = torch.cat(groups), torch.tensor(sizes)
    senses, counts, inertia = S.cluster_groups(x, sz, k=4, iters=50, seed=0)
    ours = sklearn = 0.0
    for grp, s, c, i in zip(groups, senses, counts, inertia, strict=True):
        assert int(c.sum()) == len(grp) and len(s) == len(c) <= 4
        if len(grp) <= 4:
            assert torch.equal(s, grp)  # few samples: kept as they are
            continue
        km = KMeans(4, n_init=1, random_state=0).fit(grp.double().numpy())
        ours += float(i)
        sklearn += km.inertia_
        assert float(((grp[:, None] - s[None]) ** 2).sum(-1).min(1).values.sum()) == pytest.approx(float(i), rel=1e-4)
    assert ours <= 1.01 * sklearn
    again = S.cluster_groups(x, sz, k=4, iters=50, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(senses, again[0], strict=True))
    assert torch.equal(inertia, again[2])


def _blobs(b: int, n: int, d: int = 12, k: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=g) * 1.5  # overlapping clusters: Lloyd needs several iterations
    pick = torch.randint(0, k, (b, n), generator=g)
    return centres[torch.arange(b)[:, None], pick] + torch.randn(b, n, d, generator=g)


def test_kmeans_gram_path_equals_direct_path(monkeypatch):
    # Groups of <= GRAM_MAX_SAMPLES samples run through their Gram matrix; it must give the clustering
    # of the direct path (same seeding draws, same assignments, same stopping rule).
    x = _blobs(6, 40)
    mask = torch.ones(6, 40, dtype=torch.bool)
    mask[3:, 31:] = False  # three padded groups
    x[~mask] = 7.0  # padding content must not matter
    assert S.GRAM_MAX_SAMPLES >= 40
    c_g, n_g, i_g = S.kmeans_padded(x, mask, 4, 50, torch.Generator().manual_seed(1))
    monkeypatch.setattr(S.kmeans, "GRAM_MAX_SAMPLES", 0)
    c_d, n_d, i_d = S.kmeans_padded(x, mask, 4, 50, torch.Generator().manual_seed(1))
    assert torch.equal(n_g, n_d)
    assert torch.equal(n_g.sum(1), mask.sum(1))
    torch.testing.assert_close(c_g, c_d, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(i_g, i_d, rtol=1e-5, atol=1e-3)


def test_kmeans_single_group_path_equals_batched_loop():
    x = _blobs(1, 300, seed=3)[0]
    x2 = (x * x).sum(1)
    init = x[torch.randperm(300, generator=torch.Generator().manual_seed(0))[:4]]
    c1, n1, i1 = S._lloyd_one(x, x2, init.clone(), 50, 1e-6)
    cb = S._lloyd_batch(
        x[None], x2[None], torch.ones(1, 300, dtype=torch.bool), False, init[None].clone(), torch.tensor([1e-6]), 50
    )[0]
    torch.testing.assert_close(c1, cb, rtol=1e-4, atol=1e-4)
    d = ((x[:, None] - c1[None]) ** 2).sum(-1)
    assert torch.equal(n1, torch.bincount(d.argmin(1), minlength=4))
    assert float(i1) == pytest.approx(float(d.min(1).values.sum()), rel=1e-4)


def test_kmeans_duplicate_points():
    x = torch.ones(30, 8)
    senses, counts, _ = S.cluster_groups(x, torch.tensor([30]), k=5, iters=10, seed=0)
    assert counts[0].sum() == 30 and torch.allclose(senses[0], torch.ones(len(senses[0]), 8))


# ---------------------------------------------------------------------------------------- composition


def test_compose_senses_by_hand():
    t1 = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    t2 = torch.tensor([[1.0, 1.0], [9.0, 9.0], [100.0, 100.0]])
    t3 = torch.tensor([[2.0, 2.0], [20.0, 20.0]])
    c, n = S.compose_senses([t1, t2], [torch.tensor([5, 7]), torch.tensor([3, 9, 1])])
    assert torch.allclose(c, torch.tensor([[0.5, 0.5], [9.5, 9.5]]))
    assert n.tolist() == [3, 7]
    c3, _ = S.compose_senses([t1, t2, t3])
    # chain 2: mean(10, 9) = 9.5 is nearer 2 (7.5) than 20 (10.5): (10 + 9 + 2) / 3 = 7
    assert torch.allclose(c3, torch.tensor([[1.0, 1.0], [7.0, 7.0]]))
    with pytest.raises(S.SenseError):
        S.compose_senses([t1, torch.zeros(0, 2)])


class _FakeLexicon:
    fingerprint = "fake-lexicon"

    def __init__(self, tails, heads):
        self._tails, self._heads = tails, heads

    def multi_token_tails(self):
        return self._tails

    def heads(self):
        return self._heads


def test_build_stores_composed_spans(tmp_path, monkeypatch, toy_store, tiny_teacher_dir, toy_corpus, tokenizer):
    base = S.SenseStore.open(toy_store)
    have = [t for t in range(base.vocab_size) if base.n_senses(t) > 0]
    missing = next(t for t in range(base.vocab_size) if base.n_senses(t) == 0)
    tails = [(have[0], have[1]), (have[2], have[3], have[4]), (have[0], missing)]
    monkeypatch.setattr(S.build, "_lexicon", lambda d, tok: _FakeLexicon(tails, [have[0], missing]))
    out = S.build_senses(
        str(tiny_teacher_dir), _cfg(toy_corpus, key="actual"), tmp_path, tmp_path / "s", progress=False
    )
    st = S.SenseStore.open(out)
    assert st.n_entries == st.vocab_size + 2
    assert st.meta["coverage"]["multi_token_tails_composed"] == 2
    assert st.meta["coverage"]["lexicon_heads_with_senses"] == 1
    assert st.meta["lexicon"]["fingerprint"] == "fake-lexicon"
    for i, tail in enumerate(tails[:2]):
        e = st.entry_of(tail)
        assert e == st.vocab_size + i
        want, n = S.compose_senses([st.senses(t) for t in tail], [st.counts(t) for t in tail])
        assert torch.allclose(st.senses(e), want, atol=5e-3) and torch.equal(st.counts(e), n)
    assert st.entry_of(tails[2]) is None
    # the token senses equal the lexicon-free build's
    assert all(torch.equal(st.senses(t), base.senses(t)) for t in have)


# -------------------------------------------------------------------------------------- store and I/O


def test_gathered_state_is_lm_head_input(tokenizer):
    model = make_model(len(tokenizer), layers=2)
    ids = torch.tensor([tokenizer("The red car and the blue bus.")["input_ids"]])
    cap = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: cap.__setitem__("h", a[0]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hook.remove()
    assert torch.equal(out.hidden_states[-1], cap["h"])


def test_store_round_trip_and_memmap(toy_store, tmp_path, tiny_teacher_dir, toy_corpus):
    from safetensors.torch import load_file

    st = S.SenseStore.open(toy_store)
    raw = load_file(str(toy_store / S.STORE_FILE))
    assert st.dtype == torch.float16 and st._rows(2, 5).shape == (3, 32)  # rows read lazily
    assert st.dim == 32 and st.n_entries == st.vocab_size and raw["senses"].dtype == torch.float16
    for e in range(st.vocab_size):
        a, b = int(raw["offsets"][e]), int(raw["offsets"][e + 1])
        assert torch.equal(st.senses(e), raw["senses"][a:b].float())
        assert st.senses(e).shape == (b - a, 32) and torch.equal(st.counts(e), raw["counts"][a:b])
    m = st.meta
    assert m["complete"] and m["coverage"]["vocab_tokens_with_senses"] > 50
    assert 0 < m["distance"]["p10_mse"] < m["distance"]["median_mse"] < m["distance"]["p90_mse"]
    assert st.entry_of((3,)) == 3 and st.entry_of((3, 4)) is None
    # counts: every kept sample is in exactly one sense
    assert int(raw["counts"].sum()) == m["counts"]["samples"]
    # bf16 store reads back through the uint16 view
    out = S.build_senses(
        str(tiny_teacher_dir),
        _cfg(toy_corpus, key="actual", store_dtype="bfloat16"),
        None,
        tmp_path / "bf",
        progress=False,
    )
    bf = S.SenseStore.open(out)
    raw_bf = load_file(str(out / S.STORE_FILE))["senses"]
    assert raw_bf.dtype == torch.bfloat16 and torch.equal(
        torch.cat([bf.senses(e) for e in range(bf.vocab_size)]), raw_bf.float()
    )
    assert torch.allclose(torch.cat([bf.senses(e) for e in range(bf.vocab_size)]), raw["senses"].float(), atol=0.05)


def test_refuses_other_teacher(toy_store, tmp_path, tokenizer):
    from dskd.models import fingerprint, load_model, load_tokenizer

    st = S.SenseStore.open(toy_store)
    own = fingerprint(load_model(st.meta["teacher"]["spec"]), load_tokenizer(st.meta["teacher"]["spec"]))
    assert S.SenseStore.open(toy_store, teacher_fingerprint=own).teacher_fingerprint == own
    other = fingerprint(make_model(len(tokenizer), layers=2), tokenizer)
    with pytest.raises(S.SenseError, match="another teacher|rebuild the store"):
        S.SenseStore.open(toy_store, teacher_fingerprint=other)
    with pytest.raises(S.SenseError, match="not a sense store"):
        S.SenseStore.open(tmp_path)


def test_skip_when_matching(toy_store, tiny_teacher_dir, toy_corpus, capsys):
    before = (toy_store / S.STORE_FILE).stat().st_mtime_ns
    S.build_senses(str(tiny_teacher_dir), _cfg(toy_corpus, key="actual"), None, toy_store, progress=True)
    assert "skipped" in capsys.readouterr().out
    assert (toy_store / S.STORE_FILE).stat().st_mtime_ns == before


def test_resume_equals_uninterrupted(tmp_path, monkeypatch, tiny_teacher_dir, toy_corpus):
    cfg = _cfg(toy_corpus, checkpoint_every=2, keep_samples=True)  # key=predicted; 10 batches
    whole = S.build_senses(str(tiny_teacher_dir), cfg, None, tmp_path / "whole", progress=False)

    def kill(batch: int) -> None:
        if batch == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(S.build, "_on_batch_end", kill)
    with pytest.raises(KeyboardInterrupt):
        S.build_senses(str(tiny_teacher_dir), cfg, None, tmp_path / "resumed", progress=False)
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / "progress.json").read_text())["next_batch"] == 6
    monkeypatch.setattr(S.build, "_on_batch_end", lambda b: None)
    resumed = S.build_senses(str(tiny_teacher_dir), cfg, None, tmp_path / "resumed", progress=True)
    assert not partial.exists()
    for f in (S.STORE_FILE, S.SAMPLES_FILE):
        assert (whole / f).read_bytes() == (resumed / f).read_bytes()
    a, b = (json.loads((d / S.META_FILE).read_text()) for d in (whole, resumed))
    assert a["distance"] == b["distance"] and a["counts"] == b["counts"] and a["build_id"] == b["build_id"]
    # kept samples are reused when only the clustering changes
    again = S.build_senses(
        str(tiny_teacher_dir), _cfg(toy_corpus, k=2, checkpoint_every=2), None, whole, progress=False
    )
    assert json.loads((again / S.META_FILE).read_text())["timing"]["gather_reused"]


def test_corpus_errors(tokenizer, tmp_path):
    with pytest.raises(S.CorpusError, match="--senses.corpus"):
        S.token_stream(tokenizer, [str(tmp_path / "nope")], 100)
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(S.CorpusError, match="bad.jsonl:1"):
        S.token_stream(tokenizer, [str(tmp_path / "bad.jsonl")], 100)


def test_corpora_are_interleaved_by_tokens(tokenizer, tmp_path):
    (tmp_path / "x.txt").write_text("\n\n".join(["hot cold " * 60] * 40))  # split into ~4,000-char documents
    (tmp_path / "y.jsonl").write_text("\n".join(json.dumps({"text": "red blue " * 10}) for _ in range(300)))
    stream, per = S.token_stream(tokenizer, [str(tmp_path / "x.txt"), str(tmp_path / "y.jsonl")], 3000)
    assert len(stream) == 3000 and per[str(tmp_path / "x.txt")] >= 600 and per[str(tmp_path / "y.jsonl")] >= 600


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_build_show_plot(tmp_path, tiny_teacher_dir, toy_corpus, capsys):
    from dskd.__main__ import main

    out = tmp_path / "store"
    argv = ["senses", "build", "--model.teacher", str(tiny_teacher_dir), "--senses.corpus", str(toy_corpus / "a.txt")]
    argv += ["--out", str(out), "--senses.k", "3", "--senses.max_tokens", "1500", "--senses.seq_len", "64"]
    argv += ["--senses.key", "actual"]
    assert main(argv) == 0
    assert main(["senses", "show", str(out), "red"]) == 0
    text = capsys.readouterr().out
    assert "'red'" in text and "sense 0" in text and "nearest" in text
    png = tmp_path / "fig.png"
    assert main(["plot", "senses", "--store", str(out), "--words", "red,blue,car,bus,opposite", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert (
        main(["senses", "build", "--model.teacher", str(tiny_teacher_dir), "--out", str(out), "--senses.k", "0"]) == 2
    )
    assert "--senses.k" in capsys.readouterr().err
