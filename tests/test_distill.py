"""The training loop: run folder, export, accumulation/resume/cache/multi-process equivalences, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOY_TEXT
from fakes import FakeLexicon, FakeStore
from safetensors.torch import load_file

from dskd import data as D
from dskd.checkpoint import latest_checkpoint
from dskd.config import ConfigError, from_dict
from dskd.data import CacheError, TeacherCache, build_teacher_cache
from dskd.distill import distill

ROOT = Path(__file__).resolve().parents[1]
SYN = [(" big", " large"), (" red", " crimson"), (" fast", " quick"), (" happy", " glad")]
ANT = [(" hot", " cold"), (" good", " bad"), (" big", " small"), (" happy", " sad"), (" rise", " fall")]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n\n".join(TOY_TEXT[-2600:][i : i + 200] for i in range(0, 2600, 200)))
    return p


@pytest.fixture(scope="module")
def senses(tokenizer):
    """A fake sense store over the whole toy vocabulary (d = 32) and a small relation table."""

    def tid(w):
        ids = tokenizer(w)["input_ids"]
        assert len(ids) == 1, w
        return ids[0]

    store = FakeStore.random(list(range(len(tokenizer))), 32, k=3, seed=1)
    lex = FakeLexicon.from_pairs([(tid(a), tid(b)) for a, b in SYN], [(tid(a), tid(b)) for a, b in ANT])
    return store, lex


def make_cfg(teacher_dir, text_file, **over):
    d = {
        "model": {"teacher": str(teacher_dir), "student_layers": 2, "trainable_layers": 1},
        "data": {"tasks": [], "text_files": [str(text_file)], "max_length": 48},
        "loss": {"lam": 1.0, "kappa": 2, "margin": 2.0, "min_positions": 4},
        "distill": {
            "batch_size": 1,
            "grad_accum": 4,
            "epochs": 1,
            "max_steps": 3,
            "teacher_cache": False,
            "log_every": 1,
            "save_every": 0,
            "lr": 1e-2,
            "warmup_frac": 0.0,
        },
    }
    for key, value in over.items():
        sec, name = key.split("__")
        d[sec][name] = value
    return from_dict(d)


def trainable(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "trainable.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_metrics_and_exported_student(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    run = distill(make_cfg(tiny_teacher_dir, text_file), tmp_path / "run", store=store, lexicon=lex, progress=False)
    for name in ("config.yaml", "metrics.jsonl", "meta.json", "data/recipe.json", "student/config.json"):
        assert (run / name).is_file(), name
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "ce", "kd", "sense", "hidden", "hinge_active_share", "pos_mse", "neg_mse", "tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["sense"] > 0 and rows[0]["sense_terms"] > 0 and 0 <= rows[0]["hinge_active_share"] <= 1
    meta = json.loads((run / "meta.json").read_text())
    assert meta["complete"] and meta["senses"]["table"]["related_tokens"] > 0 and meta["steps"] == 3
    # the trained weights moved, the frozen ones did not
    w = trainable(run)
    assert list(w) and all(k.startswith("model.layers.1.") for k in w)
    # a checkpoint is safetensors + JSON, nothing pickled (dskd.checkpoint says why not accelerate's save_state)
    assert sorted(p.name for p in latest_checkpoint(run).iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "rng-0.safetensors",
        "scheduler.json",
        "state.json",
        "trainable.safetensors",
    ]
    # plain transformers, without importing dskd, reloads the student and gives the trained model's logits
    from dskd.models import load_model, truncate

    ref = truncate(load_model(str(tiny_teacher_dir)), 2)
    ref.load_state_dict(w, strict=False)
    ids = [[5, 17, 42, 99, 7]]
    code = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM as A; "
        f"m = A.from_pretrained({str(run / 'student')!r}); assert 'dskd' not in sys.modules; "
        f"print(json.dumps(m(torch.tensor({ids})).logits[0].tolist()))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(expected, truncate(load_model(str(tiny_teacher_dir)), 2)(torch.tensor(ids)).logits[0])


def test_grad_accumulation_1x4_equals_4x1(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    kw = {"store": store, "lexicon": lex, "progress": False}
    common = {"loss__hidden": "mse", "loss__hidden_weight": 0.5}
    a = distill(
        make_cfg(tiny_teacher_dir, text_file, distill__batch_size=4, distill__grad_accum=1, **common),
        tmp_path / "a",
        **kw,
    )
    b = distill(
        make_cfg(tiny_teacher_dir, text_file, distill__batch_size=1, distill__grad_accum=4, **common),
        tmp_path / "b",
        **kw,
    )
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        for k in ("loss", "ce", "kd", "sense", "hidden"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k
        assert ra["tokens"] == rb["tokens"]
    wa, wb = trainable(a), trainable(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resume_after_kill_reaches_the_same_weights(tiny_teacher_dir, text_file, senses, tmp_path):
    store, lex = senses
    kw = {"store": store, "lexicon": lex, "progress": False}
    cfg = make_cfg(tiny_teacher_dir, text_file, distill__max_steps=5, distill__save_every=2, distill__grad_accum=2)
    full = distill(cfg, tmp_path / "full", **kw)
    run = distill(cfg, tmp_path / "killed", stop_after=3, **kw)  # dies after step 3; newest checkpoint: step 2
    assert not (run / "student").exists() and latest_checkpoint(run).name == "step-00000002"
    with pytest.raises(ConfigError, match="--resume"):
        distill(cfg, run, resume=False, **kw)
    with pytest.raises(ConfigError, match="loss.kappa"):
        distill(make_cfg(tiny_teacher_dir, text_file, distill__max_steps=5, loss__kappa=3), run, **kw)
    distill(cfg, run, resume=True, **kw)
    wf, wr = trainable(full), trainable(run)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)  # exactly, on CPU
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(run)]


@pytest.mark.parametrize(
    ("cache_kd", "hidden_dtype", "rel", "atol"),
    [
        ("auto", "float32", 1e-5, 1e-5),  # no logits cached: recomputed through the shared head
        ("auto", "float16", 3e-3, 2e-3),  # the same from fp16 states: equal within fp16's precision
        ("logits", "float32", 1e-5, 1e-5),  # the full logits cached
    ],
)
def test_cached_teacher_equals_online_teacher(
    cache_kd, hidden_dtype, rel, atol, tiny_teacher_dir, text_file, senses, tmp_path, capsys
):
    from safetensors import safe_open

    store, lex = senses
    kw = {"store": store, "lexicon": lex, "progress": False}
    common = {"distill__cache_kd": cache_kd, "distill__cache_topk": 0, "distill__cache_hidden_dtype": hidden_dtype}
    common.update(loss__hidden="cosine", loss__hidden_weight=0.3)
    online = distill(make_cfg(tiny_teacher_dir, text_file, **common), tmp_path / "online", **kw)
    cache_dir = tmp_path / "cache"
    cached_cfg = make_cfg(tiny_teacher_dir, text_file, distill__teacher_cache=True, **common)
    cached = distill(cached_cfg, tmp_path / "cached", cache_dir=cache_dir, **kw)
    for ro, rc in zip(metrics(online), metrics(cached), strict=True):
        for k in ("loss", "ce", "kd", "sense", "hidden"):
            assert ro[k] == pytest.approx(rc[k], rel=rel, abs=1e-7), k
    wo, wc = trainable(online), trainable(cached)
    assert all(torch.allclose(wo[k], wc[k], atol=atol) for k in wo)
    meta = json.loads((cached / "meta.json").read_text())
    cache_meta = json.loads((cache_dir / "meta.json").read_text())
    with safe_open(str(cache_dir / cache_meta["shards"][0]), framework="pt") as f:
        stored = set(f.keys())
    if cache_kd == "auto":  # a truncated student shares the teacher's head: the cache holds no logits
        # and the state entering the trained layer: the cached run did not run the frozen one
        assert meta["teacher_cache"]["settings"]["kd"] == "head" and stored == {"hidden", "prefix"}
        assert meta["teacher_cache"]["settings"]["prefix_layers"] == 1
        assert "exact KD" in capsys.readouterr().out
    else:
        assert meta["teacher_cache"]["settings"]["kd"] == "logits" and stored == {"hidden", "logits", "prefix"}
    if hidden_dtype == "float16":
        # fp16 states are not bit-exact: the test above would pass for any rounding, so check it matters
        assert any(ro["kd"] != rc["kd"] for ro, rc in zip(metrics(online), metrics(cached), strict=True))
        return
    # a cache is reused, and refused for another recipe (here: another data recipe)
    stamp = (cache_dir / "meta.json").stat().st_mtime_ns
    assert (
        build_teacher_cache(cached_cfg.model, cached_cfg.data, cached_cfg.distill, cached_cfg.loss.T, cache_dir)
        == cache_dir
    )
    assert (cache_dir / "meta.json").stat().st_mtime_ns == stamp
    other = make_cfg(tiny_teacher_dir, text_file, distill__teacher_cache=True, data__max_length=40, **common)
    with pytest.raises(CacheError, match="another teacher or data recipe"):
        distill(other, tmp_path / "other", cache_dir=cache_dir, **kw)
    with pytest.raises(CacheError, match="another teacher or data recipe"):
        TeacherCache.open(cache_dir, key="0" * 16)


def test_cached_prefix_states_replace_the_frozen_layers(tiny_teacher_dir, text_file, senses, tmp_path, capsys):
    """Training from the cached state entering the first trained layer is training the whole student."""
    from dskd.models import load_model
    from dskd.prefix import prefix_states

    store, lex = senses
    kw = {"store": store, "lexicon": lex, "progress": False}
    runs = {}
    for mode in ("auto", "off"):
        cfg = make_cfg(
            tiny_teacher_dir,
            text_file,
            model__student_layers=3,
            distill__teacher_cache=True,
            distill__cache_hidden_dtype="float32",
            distill__cache_prefix=mode,
        )
        runs[mode] = distill(cfg, tmp_path / mode, cache_dir=tmp_path / f"cache_{mode}", **kw)
        out = capsys.readouterr().out
        assert ("training runs the student's layers 2-2 from the cached state entering layer 2" in out) == (
            mode == "auto"
        )
    for ra, ro in zip(metrics(runs["auto"]), metrics(runs["off"]), strict=True):
        for k in ("loss", "ce", "kd", "sense"):
            assert ra[k] == pytest.approx(ro[k], rel=1e-5, abs=1e-7), k
    wa, wo = trainable(runs["auto"]), trainable(runs["off"])
    assert wa.keys() == wo.keys() and all(torch.allclose(wa[k], wo[k], atol=1e-5) for k in wa)
    # the training moved the weights, so equal weights are not the initial ones twice
    assert any((wa[k] - load_model(str(tiny_teacher_dir)).state_dict()[k]).abs().max() > 1e-3 for k in wa)
    # the stored states are the teacher's after its first two layers
    cache = TeacherCache.open(tmp_path / "cache_auto")
    assert cache.prefix_layers == 2 and TeacherCache.open(tmp_path / "cache_off").prefix_layers == 0
    seq = cache.data.seqs[0]
    teacher = load_model(str(tiny_teacher_dir))
    with torch.no_grad():
        want = prefix_states(teacher, 2, input_ids=seq[None, :-1])[0]  # (n, d)
    got = cache.prefix([0], len(seq))[0]  # (T, d), the last position zero
    assert torch.allclose(got[: len(seq) - 1], want, atol=1e-5) and not got[-1].any()
    with pytest.raises(CacheError, match="keeps no prefix states"):
        TeacherCache.open(tmp_path / "cache_off").prefix([0], len(seq))


def test_sparse_cache_with_top_k(tiny_teacher_dir, text_file, tmp_path, capsys):
    cfg = make_cfg(
        tiny_teacher_dir,
        text_file,
        distill__teacher_cache=True,
        distill__cache_kd="logits",
        distill__cache_topk=8,
        loss__lam=0.0,
    )
    run = distill(cfg, tmp_path / "sparse", progress=False)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["teacher_cache"]["settings"] == {
        "kd": "topk",
        "topk": 8,
        "vocab_size": meta["model"]["vocab_size"],
        "hidden_dtype": "float16",
        "T": 2.0,
        "prefix_layers": 1,  # the frozen bottom layer of the 2-layer student
    }
    # the tail bucket's mass is recorded and printed by the run
    tail = meta["teacher_cache"]["tail_mass"]
    assert 0 < tail["p10"] <= tail["median"] <= tail["p90"] < 1 and 0 < tail["mean"] < 1
    assert f"holding on average {tail['mean']:.3f}" in capsys.readouterr().out
    # the default cache folder is shared by the runs next to this one
    assert Path(meta["teacher_cache"]["path"]).parent == tmp_path / "teacher_cache"
    assert all(r["kd"] > 0 and r["sense"] == 0 for r in metrics(run))


def test_antonym_margin_is_calibrated_at_the_teacher_states(tiny_teacher_dir, text_file, senses, tmp_path, capsys):
    """Default margin: the margin_quantile quantile of MSE(antonym sense, teacher state) of the first sequences,
    so at the teacher's own states (measured here through sense_loss itself) that share of the hinge is on."""
    from dskd.losses import sense_loss
    from dskd.models import load_model
    from dskd.sense_targets import build_sense_table, window_plans

    store, lex = senses
    q = 0.3
    cfg = make_cfg(tiny_teacher_dir, text_file, distill__teacher_cache=True, loss__margin_quantile=q)
    assert cfg.loss.margin_mode == "antonym_quantile"
    run = distill(cfg, tmp_path / "run", store=store, lexicon=lex, progress=False)
    meta = json.loads((run / "meta.json").read_text())
    table_info = meta["senses"]["table"]
    cal = table_info["margin_calibration"]
    assert table_info["margin_calibrated"] and cal["quantile"] == q and cal["antonym_terms"] >= 50
    m = table_info["margin"]
    assert cal["teacher_antonym_mse"]["p25"] <= m <= cal["teacher_antonym_mse"]["p50"]
    assert f"antonym margin {m:.4g}" in capsys.readouterr().out
    # independently: the teacher's states of the same sequences and positions through sense_loss
    data = TeacherCache.open(meta["teacher_cache"]["path"]).data
    table = build_sense_table(store, lex, sorted({int(t) for s in data.seqs for t in s[1:].tolist()}), cfg.loss)
    table.margin = m
    teacher = load_model(str(tiny_teacher_dir))
    active = total = 0
    order = [i for mb in D.epoch_batches(len(data), 1, cfg.distill.seed, 0) for i in mb][: cal["sequences"]]
    for i in order:
        plans = window_plans(data, [i], table, cfg.loss, cfg.distill.seed, 0, 0)
        batch = D.collate([data.seqs[i]], 0)
        with torch.no_grad():
            ht = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        st = sense_loss(ht, ht, batch["labels"], [plans[i]], table, cfg.loss.kappa).stats
        active, total = active + st["hinge_active"].item(), total + st["neg_n"].item()
    assert total == cal["antonym_terms"]
    assert abs(active / total - q) <= 2 / total
    # the share of active hinge terms over training: in metrics.jsonl and summarised in meta.json
    summary = meta["sense_summary"]
    assert summary["margin"] == m and summary["logged_steps"] == 3
    shares = [r["hinge_active_share"] for r in metrics(run)]
    assert summary["hinge_active_share"]["first"] == shares[0] and summary["hinge_active_share"]["last"] == shares[-1]
    # the paper's absolute margin stays one flag away
    absolute = make_cfg(tiny_teacher_dir, text_file, distill__teacher_cache=True, loss__margin_mode="absolute")
    run = distill(absolute, tmp_path / "abs", store=store, lexicon=lex, progress=False)
    assert json.loads((run / "meta.json").read_text())["senses"]["table"]["margin"] == 2.0


def test_lam_needs_sense_folders(tiny_teacher_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="--distill.lexicon_dir"):
        distill(make_cfg(tiny_teacher_dir, text_file), tmp_path / "x", progress=False)


def test_cli_distill_and_cache_build(tiny_teacher_dir, text_file, tmp_path, capsys):
    import yaml

    from dskd.__main__ import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
                "data": {"tasks": [], "text_files": [str(text_file)], "max_length": 32},
                "loss": {"lam": 0.0},
                "distill": {"max_steps": 2, "grad_accum": 1, "save_every": 1, "log_every": 1},
            }
        )
    )
    cache = tmp_path / "cache"
    assert main(["cache", "build", "--config", str(cfg), "--distill.cache_dir", str(cache)]) == 0
    assert "teacher cache:" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["distill", "--config", str(cfg), "--distill.cache_dir", str(cache), "--out", str(out)]
    assert main(argv) == 0
    assert (out / "student" / "config.json").is_file() and len(metrics(out)) == 2
    assert main(argv) == 2  # a finished run is not overwritten without --resume
    assert "already holds a finished run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])  # with the cache: the frozen layer's output from it too
def test_two_processes_match_one_process_with_twice_the_accumulation(cached, tiny_teacher_dir, text_file, tmp_path):
    """DDP over gloo (2 CPU processes, accumulation 2) follows 1 process with accumulation 4."""
    import yaml

    runs = {}
    for name, procs, accum in (("one", 1, 4), ("two", 2, 2)):
        c = make_cfg(
            tiny_teacher_dir,
            text_file,
            loss__lam=0.0,
            loss__hidden="mse",
            loss__hidden_weight=0.5,
            distill__teacher_cache=cached,
            distill__cache_hidden_dtype="float32",
        )
        c.distill.grad_accum = accum
        c.distill.max_steps = 3
        path = tmp_path / f"{name}.yaml"
        from dskd.config import to_dict

        path.write_text(yaml.safe_dump(to_dict(c)))
        out = tmp_path / name
        # accelerate launch needs mpirun for several CPU processes; torchrun starts them, and accelerate's
        # Accelerator picks up the process group (gloo on CPU) from its environment
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        cmd += ["-m", "dskd", "distill", "--config", str(path), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert ("from the cached state entering layer 1" in r.stdout) == cached
        runs[name] = out
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert json.loads((runs["two"] / "meta.json").read_text())["processes"] == 2
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "ce", "kd", "hidden"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
        assert a["tokens"] == b["tokens"]
    w1, w2 = trainable(runs["one"]), trainable(runs["two"])
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def test_with_the_real_lexicon_and_sense_store(tiny_teacher_dir, text_file, tokenizer, tmp_path, capsys):
    """Integration: dskd.lexicon + dskd.senses folders (built from the tiny teacher) drive the sense loss."""
    from dskd.config import LexiconConfig, SenseConfig
    from dskd.lexicon import build_lexicon
    from dskd.senses import build_senses

    syn, ant = tmp_path / "syn.txt", tmp_path / "ant.txt"
    syn.write_text("".join(f"{a.strip()} {b.strip()}\n" for a, b in SYN))
    ant.write_text("".join(f"{a.strip()} {b.strip()}\n" for a, b in ANT))
    lex_cfg = LexiconConfig(sources=[f"pairs:{syn}:syn", f"pairs:{ant}:ant"], normalize_negation=False)
    lex = build_lexicon(tokenizer, str(tiny_teacher_dir), lex_cfg, tmp_path / "lexicon", quiet=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TOY_TEXT)
    sen_cfg = SenseConfig(corpus=[str(corpus)], k=2, max_samples=20, max_tokens=3000, seq_len=64, batch_size=4)
    store = build_senses(str(tiny_teacher_dir), sen_cfg, lex, tmp_path / "senses", progress=False)
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__margin=0.5, loss__margin_mode="relative")
    cfg.distill.lexicon_dir, cfg.distill.senses_dir = str(lex), str(store)
    run = distill(cfg, tmp_path / "run", progress=False)
    meta = json.loads((run / "meta.json").read_text())
    table = meta["senses"]["table"]
    assert table["related_tokens"] > 0 and table["store_median_mse"] > 0
    assert table["margin"] == pytest.approx(0.5 * table["store_median_mse"])
    assert meta["senses"]["store"]["teacher_fingerprint"] == meta["teacher_fingerprint"]
    assert all(r["sense"] > 0 and r["sense_terms"] > 0 for r in metrics(run))
    # the run says how many training targets have k-means senses and how many only raw states (seen <= k times)
    n, c = table["targets_with_senses"], table["targets_clustered"]
    assert 0 < c < n <= table["tokens"]
    assert 0 < table["target_positions_clustered"] <= table["target_positions_with_senses"] <= table["target_positions"]
    assert f"{c:,} clustered into k-means senses, {n - c:,} only raw states" in capsys.readouterr().out


@pytest.mark.parametrize("teacher_kind", ["logits", "states", "sparse"])
def test_head_at_targets_only_gives_the_same_losses_and_gradients(teacher_kind, tokenizer):
    """Padding has no target: applying the frozen head only at targets changes no loss and no gradient."""
    from conftest import make_model

    from dskd.config import LossConfig
    from dskd.distill import _States, micro_batch_loss
    from dskd.losses import sparse_teacher
    from dskd.models import freeze_except_top, head_at_targets_ok, truncate

    torch.manual_seed(0)
    teacher = make_model(len(tokenizer), layers=3).eval()
    V = len(tokenizer)
    seqs = [torch.randint(0, V, (11,)), torch.randint(0, V, (6,))]
    batch = D.collate(seqs, 0)  # the second row is padded
    assert (batch["labels"] == -100).sum() > 2
    with torch.no_grad():
        o = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    lc = LossConfig(lam=0.0, hidden="mse", hidden_weight=0.5)
    n_tok = float((batch["labels"] != -100).sum())
    results = {}
    for at_targets in (False, True):
        student = truncate(teacher, 2)
        freeze_except_top(student, 1)
        student.train()
        assert head_at_targets_ok(student)
        if teacher_kind == "logits":
            t = o.logits
        elif teacher_kind == "sparse":
            t = sparse_teacher(o.logits, 8, lc.T)
        else:  # a head-only cache: the states, or the logits recomputed from them
            t = _States(o.hidden_states[-1]) if at_targets else student.lm_head(o.hidden_states[-1])
        loss, terms, _ = micro_batch_loss(
            student,
            batch,
            t,
            o.hidden_states[-1],
            lc,
            V,
            n_tok,
            1.0,
            [],
            None,
            contextlib.nullcontext(),
            None,
            at_targets,
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results[at_targets] = ({k: float(v.detach()) for k, v in terms.items()}, grads)
    (t0, g0), (t1, g1) = results[False], results[True]
    assert t0.keys() == t1.keys() and all(t0[k] == pytest.approx(t1[k], rel=1e-5, abs=1e-7) for k in t0)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-4) for k in g0)
    assert any(g.abs().max() > 0 for g in g0.values())


def test_head_at_targets_needs_a_frozen_head(tokenizer):
    from conftest import make_model

    from dskd.models import head_at_targets_ok

    model = make_model(len(tokenizer), layers=2, tie=False)
    assert not head_at_targets_ok(model)  # its head is trainable (a separate student's own head)
    model.lm_head.weight.requires_grad_(False)
    assert head_at_targets_ok(model)
