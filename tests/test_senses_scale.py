"""Sense dictionary at scale: rows on disk, streamed corpora, devices, several processes (tiny models only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOY_TEXT

from dskd import senses as S
from dskd.config import SenseConfig
from dskd.senses.build import _merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def doc_corpus(tmp_path_factory) -> Path:
    """A .jsonl corpus of many short documents (so the blocks layout has many blocks)."""
    d = tmp_path_factory.mktemp("docs")
    lines = [s.strip() + "." for s in TOY_TEXT.split(". ") if s.strip()]
    docs = [" ".join(lines[i : i + 3]) for i in range(0, 240, 3)]
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    return d / "docs.jsonl"


def _cfg(corpus: Path, **kw) -> SenseConfig:
    base = dict(corpus=[str(corpus)], k=3, max_samples=40, max_tokens=1500, seq_len=32, batch_size=4, seed=0)
    base.update(kw)
    return SenseConfig(**base)


# ------------------------------------------------------------------------------------------ rows on disk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_file_round_trip(tmp_path, dtype):
    rf = S.RowFile(tmp_path / "rows.bin", 8, dtype)
    x = torch.randn(50, 8)
    rows = torch.randperm(50)
    rf.write(rows, x)
    rf.write(torch.tensor([120]), x[:1])  # grows the file
    assert rf.n_rows >= 121 and (tmp_path / "rows.bin").stat().st_size >= 121 * 8 * x[:0].to(dtype).element_size()
    got = rf.take(rows)
    assert got.dtype == torch.float32 and torch.equal(got, x.to(dtype).float())
    assert torch.equal(rf.take_raw(torch.tensor([120])), x[:1].to(dtype))


def test_row_file_row_given_twice_gets_its_last_value(tmp_path):
    rf = S.RowFile(tmp_path / "rows.bin", 4, torch.float32)
    x = torch.arange(20.0).view(5, 4)
    rf.write(torch.tensor([3, 1, 3, 2, 3]), x)  # row 3 three times in one call: the last (x[4]) wins
    assert torch.equal(rf.take(torch.tensor([1, 2, 3])), x[[1, 3, 4]])
    rf.write(torch.tensor([1]), -x[:1])  # a later call overwrites
    assert torch.equal(rf.take(torch.tensor([1, 3])), torch.stack([-x[0], x[4]]))


def test_row_file_persists_after_flush_and_close(tmp_path):
    path = tmp_path / "rows.bin"
    rf = S.RowFile(path, 6, torch.bfloat16)
    x = torch.randn(30, 6)
    rf.write(torch.arange(10, 40), x)
    rf.flush()
    rf.close()
    rf.close()  # twice is harmless
    back = S.RowFile(path, 6, torch.bfloat16, writable=False)
    assert back.n_rows >= 40
    assert torch.equal(back.take_raw(torch.arange(10, 40)), x.to(torch.bfloat16))
    with pytest.raises(FileNotFoundError):
        S.RowFile(tmp_path / "missing.bin", 6, torch.float32, writable=False)


def test_row_file_reads_any_order_and_refuses_rows_outside(tmp_path):
    rf = S.RowFile(tmp_path / "rows.bin", 3, torch.float16)
    x = torch.randn(8, 3)
    rf.write(torch.arange(8), x)
    rows = torch.tensor([5, 0, 5, 2, 7, 0])  # unsorted, with repeats
    assert torch.equal(rf.take(rows), x.half().float()[rows])
    assert rf.take(torch.zeros(0, dtype=torch.int64)).shape == (0, 3)
    for bad in ([rf.n_rows], [-1], [0, rf.n_rows + 5]):
        with pytest.raises(IndexError, match="rows.bin"):
            rf.take(torch.tensor(bad))


def test_row_file_writes_and_reads_a_run_of_rows_in_one_call(tmp_path, monkeypatch):
    # One system call per run of consecutive rows, whatever order the rows come in: a reservoir's new
    # samples go to consecutive fresh rows, so a batch is a few calls, not one per row.
    calls = {"pwrite": 0, "preadv": 0}
    for name in calls:
        real = getattr(os, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(os, name, counted)
    rf = S.RowFile(tmp_path / "rows.bin", 4, torch.float32)
    x = torch.randn(100, 4)
    rows = torch.cat([torch.arange(60, 100), torch.arange(0, 50)])[torch.randperm(90)]  # two runs, shuffled
    rf.write(rows, x[:90])
    assert calls["pwrite"] == 2
    assert torch.equal(rf.take(rows), x[:90])
    assert calls["preadv"] == 2


def test_senses_rows_benchmark_runs_at_tiny_size(capsys):
    import importlib.util

    from dskd.senses import reservoir

    spec = importlib.util.spec_from_file_location("senses_rows", ROOT / "benchmarks" / "senses_rows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(
        [
            "--positions",
            "3000",
            "--batch",
            "256",
            "--cap",
            "20",
            "--dim",
            "8",
            "--vocab",
            "300",
            "--checkpoint-every",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert "same samples as the file: True" in out
    assert "pwrite" in out and "preadv" in out and "fsync" in out  # counted while the benchmark ran
    assert reservoir.os is os  # the counting patch is undone


def test_file_reservoir_equals_memory_reservoir(tmp_path):
    # Copy-on-write (checkpointing) moves replaced samples to fresh rows; the samples stay the same.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (4000,), generator=g)
    states = torch.randn(4000, 4, generator=g)
    mem = S.Reservoir.empty(6, 4, cap=9, seed=2)
    disk = S.Reservoir.empty(6, 4, cap=9, seed=2, store=S.RowFile(tmp_path / "r.bin", 4, torch.float32))
    disk.copy_on_write = True
    for a in range(0, 4000, 300):
        mem.add(ids[a : a + 300], states[a : a + 300])
        disk.add(ids[a : a + 300], states[a : a + 300], pos=torch.arange(a, min(a + 300, 4000)))
        if a % 900 == 0:
            disk.commit()
    for (t1, s1), (t2, s2) in [(mem.samples(), disk.samples())]:
        assert torch.equal(t1, t2) and torch.equal(s1, s2)
    assert disk.n_rows <= 6 * 9 + 9 * 6 * 3  # bounded by the live rows plus one interval's replacements
    # the stream positions of the kept samples are recorded
    assert torch.equal(states[disk.pos], disk.samples()[1])


def test_checkpoint_holds_no_rows(tmp_path, monkeypatch, tiny_teacher_dir, doc_corpus):
    from safetensors.torch import load_file

    def kill(batch: int) -> None:
        if batch == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(S.build, "_on_batch_end", kill)
    with pytest.raises(KeyboardInterrupt):
        S.build_senses(
            str(tiny_teacher_dir), _cfg(doc_corpus, checkpoint_every=2), None, tmp_path / "s", progress=False
        )
    work = tmp_path / ".s.partial"
    ckpt = next(work.glob("progress.rank0-*.safetensors"))
    d = load_file(str(ckpt))
    assert set(d) == {"seen", "keys", "rows", "pos", "free", "n_rows", "gen", "dist"}
    assert all(t.dim() == 1 for t in d.values())  # bookkeeping only: no (rows, d) matrix
    rows_file = work / "rows.rank0.bin"
    assert rows_file.stat().st_size >= int(d["n_rows"][0]) * 32 * 4


# ------------------------------------------------------------------------------------------------ corpus


def test_streamed_windows_equal_the_sliced_stream(tokenizer, doc_corpus):
    stream, per = S.token_stream(tokenizer, [str(doc_corpus)], 700)
    wins = list(S.windows(iter(S.TokenStream(tokenizer, [str(doc_corpus)], 700)), 64))
    assert [s for s, _ in wins] == list(range(0, 699, 64))
    for s, w in wins:
        assert torch.equal(w, stream[s : s + 65])
    assert sum(w.numel() - 1 for _, w in wins) == 699 and per[str(doc_corpus)] == 700


def test_blocks_are_round_robin_and_partition_each_file(tmp_path):
    from dskd import corpus as C

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"a{i} " * 20}) for i in range(10)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"b{i} " * 20}) for i in range(6)))
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    blocks = list(S.iter_blocks([str(f) for f in files], 150))
    assert [g for g, _ in blocks] == list(range(len(blocks)))
    n_a, n_b = (-(-f.stat().st_size // 150) for f in files)  # blocks are listed from the file sizes alone
    assert n_a > n_b > 1
    assert [Path(b.corpus).stem for _, b in blocks] == ["a", "b"] * n_b + ["a"] * (n_a - n_b)
    for f in files:
        mine = [b for _, b in blocks if Path(b.corpus) == f]
        spans = [C.file_span(*b.span) for b in mine]
        # consecutive byte ranges covering the file, each starting at a line
        assert spans[0][0] == 0 and spans[-1][1] == f.stat().st_size
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))
        assert all(a == 0 or f.read_bytes()[a - 1 : a] == b"\n" for a, _ in spans)
        assert [d for b in mine for d in b.read()] == list(C.file_documents(f))


@pytest.mark.parametrize("world", [2, 3])
def test_each_reader_reads_only_its_own_blocks(tmp_path, monkeypatch, world):
    """The shards of N readers are disjoint, their union is the corpus, and a reader reads only its bytes."""
    from dskd import corpus as C

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(400)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "big.txt").write_text("\n\n".join(docs) + "\n")
    real = C.read_span
    for name in ("big.jsonl", "big.txt"):
        f = tmp_path / name
        size = f.stat().st_size
        read: dict[int, list[tuple[int, int]]] = {}
        got: dict[int, tuple[int, list[str]]] = {}
        for rank in range(world):
            log = read.setdefault(rank, [])
            monkeypatch.setattr(C, "read_span", lambda p, a, b, log=log: log.append((a, b)) or real(p, a, b))
            for g, blk in C.shard([str(f)], 1000, rank, world):
                assert g % world == rank
                got[g] = (rank, list(blk.read()))
        spans = sorted(s for r in read for s in read[r])
        assert spans[0][0] == 0 and spans[-1][1] == size  # the union is the whole file ...
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))  # ... without overlap
        for rank in range(world):
            assert sum(b - a for a, b in read[rank]) < 1.5 * size / world  # nobody reads everything
        union = [d for g in sorted(got) for d in got[g][1]]
        # .txt: paragraphs are grouped into documents per block, so compare the paragraphs
        assert "\n\n".join(union).split("\n\n") == docs


def test_dataset_blocks_are_row_ranges(tmp_path):
    import datasets

    from dskd import corpus as C

    texts = [f"document {i}" for i in range(23)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "ds")
    per = C.docs_per_block(3 * C.DOC_CHARS)
    blocks = [b for _, b in C.iter_blocks([str(tmp_path / "ds")], 3 * C.DOC_CHARS)]
    assert per == 3 and len(blocks) == 8
    assert [list(b.read()) for b in blocks] == [texts[a : a + per] for a in range(0, 23, per)]


def test_streamed_dataset_blocks_are_its_shards(tmp_path, monkeypatch):
    import datasets

    from dskd import corpus as C

    files = []
    for i in range(3):
        files.append(str(tmp_path / f"part{i}.jsonl"))
        Path(files[-1]).write_text("".join(json.dumps({"text": f"doc {i}.{j}"}) + "\n" for j in range(4)))
    streamed = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: streamed)  # stands in for a hub dataset
    blocks = [b for _, b in C.iter_blocks(["hf:some/dataset"], 65536)]
    assert [list(b.read()) for b in blocks] == [[f"doc {i}.{j}" for j in range(4)] for i in range(3)]
    assert [d for b in C.shard(["hf:some/dataset"], 65536, 1, 2) for d in b[1].read()] == [
        f"doc 1.{j}" for j in range(4)
    ]


def test_hugging_face_dataset_folder_is_a_corpus(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_dict({"id": [1, 2], "text": ["the red car", "the blue bus"]}).save_to_disk(tmp_path / "ds")
    stream, per = S.token_stream(tokenizer, [str(tmp_path / "ds")], 1000)
    want = tokenizer("the red car")["input_ids"] + [tokenizer.eos_token_id]
    want += tokenizer("the blue bus")["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == want
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(S.CorpusError, match="--senses.corpus .*text column"):
        S.token_stream(tokenizer, [str(tmp_path / "bad")], 10)
    with pytest.raises(S.CorpusError, match="--senses.corpus hf:"):
        S.token_stream(tokenizer, ["hf:no-such-owner/no-such-dataset"], 10)


# ------------------------------------------------------------------------------------------------ device


def test_device_and_dtype_resolution_is_the_one_of_every_stage(monkeypatch):
    import dskd.devices
    import dskd.senses.build as B

    assert B.resolve_device is dskd.devices.resolve_device and B.resolve_dtype is dskd.devices.resolve_dtype
    with pytest.raises(S.SenseError, match="--sample-dtype"):
        B._sample_dtype("int8", torch.device("cpu"), "bfloat16")
    assert B._sample_dtype("auto", torch.device("cpu"), "bfloat16") == "float32"
    assert B._sample_dtype("auto", torch.device("cuda", 0), "bfloat16") == "bfloat16"


def test_sense_config_runtime_fields_are_checked():
    from dskd.config import ConfigError, from_dict

    cfg = from_dict({"senses": {"device": "cpu", "dtype": "bfloat16", "sample_dtype": "float16", "block_chars": 300}})
    assert (cfg.senses.device, cfg.senses.dtype, cfg.senses.sample_dtype, cfg.senses.block_chars) == (
        "cpu",
        "bfloat16",
        "float16",
        300,
    )
    with pytest.raises(ConfigError, match="senses.dtype"):
        SenseConfig(dtype="int8")
    with pytest.raises(ConfigError, match="senses.block_chars"):
        SenseConfig(block_chars=-1)


def test_cli_device_error_names_the_flag(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    from dskd.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["senses", "build", "--model.teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "s")]
    assert main([*argv, "--senses.device", "cuda"]) == 2
    assert "device: 'cuda'" in capsys.readouterr().err


def test_kmeans_on_a_row_source_equals_the_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([200, 90, 70, 3, 1, 40])
    x = torch.randn(int(sizes.sum()), 16, generator=g)
    rf = S.RowFile(tmp_path / "x.bin", 16, torch.float32)
    perm = torch.randperm(x.shape[0], generator=g)
    rf.write(perm, x)  # row i of the groups lives at row perm[i] of the file
    src = S.MultiRowSource([rf], torch.zeros_like(perm), perm)
    a = S.cluster_groups(x, sizes, 4, 30, seed=1)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def sink(gs, ss, cs):
        got.update({gi: (s, c) for gi, s, c in zip(gs, ss, cs, strict=True)})

    for samples in (src, x):  # rows from a file, or the tensor itself, into a sink
        got.clear()
        b = S.cluster_groups(samples, sizes, 4, 30, seed=1, sink=sink)
        assert b[0] == [] and b[1] == [] and torch.equal(a[2], b[2])
        assert sorted(got) == list(range(len(sizes)))
        for i in range(len(sizes)):
            assert torch.equal(a[0][i], got[i][0]) and torch.equal(a[1][i], got[i][1])


# ------------------------------------------------------------------------------------------------ merging


def _state(seen: list[int], kept: dict[int, list[int]], cap: int) -> dict[str, torch.Tensor]:
    keys, pos = [], []
    for t, ps in kept.items():
        keys += [t * cap + s for s in range(len(ps))]
        pos += ps
    o = np.argsort(keys)
    k = torch.tensor(keys)[o]
    return {"seen": torch.tensor(seen), "keys": k, "rows": torch.arange(len(keys))[o], "pos": torch.tensor(pos)[o]}


def test_merge_keeps_everything_under_the_cap_in_stream_order():
    a = _state([2, 1, 0], {0: [5, 9], 1: [0]}, cap=10)
    b = _state([1, 0, 3], {0: [7], 2: [1, 2, 3]}, cap=10)
    tok, f, r, seen = _merge([a, b], cap=10, seed=0)
    assert tok.tolist() == [0, 0, 0, 1, 2, 2, 2] and seen.tolist() == [3, 1, 3]
    assert f.tolist() == [0, 1, 0, 0, 1, 1, 1] and r.tolist()[:3] == [0, 0, 1]  # positions 5, 7, 9


def test_merge_is_uniform_over_the_union():
    """Process A saw 100 states of each token and kept 10, B saw 300 and kept 10: of a merged cap of 10,
    A's share must be hypergeometric with mean 2.5 and each of A's kept samples equally likely."""
    from scipy.stats import chisquare

    n_tok, cap = 3000, 10
    kept = {t: list(range(cap)) for t in range(n_tok)}
    a = _state([100] * n_tok, kept, cap)
    b = _state([300] * n_tok, {t: list(range(1000, 1000 + cap)) for t in range(n_tok)}, cap)
    tok, f, r, _ = _merge([a, b], cap=cap, seed=0)
    assert torch.bincount(tok, minlength=n_tok).eq(cap).all()
    share = torch.bincount(tok[f == 0], minlength=n_tok).double()
    assert abs(share.mean().item() - 2.5) < 0.1
    assert abs(share.var().item() - 10 * 0.25 * 0.75 * (400 - 10) / 399) < 0.2  # hypergeometric variance
    slot = torch.bincount(r[f == 0] % cap, minlength=cap).numpy()  # which of A's kept samples were chosen
    assert chisquare(slot).pvalue > 1e-3
    again = _merge([a, b], cap=cap, seed=0)
    assert all(torch.equal(x, y) for x, y in zip((tok, f, r), again[:3], strict=True))


# ------------------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1"]
    cmd += [f"--master-port={_free_port()}", "-m", "dskd", "senses", "build", *args]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _args(teacher: Path, corpus: Path, out: Path, cap: int) -> list[str]:
    return [
        *("--model.teacher", str(teacher), "--senses.corpus", str(corpus), "--out", str(out), "--senses.k", "3"),
        *("--senses.max_samples", str(cap), "--senses.max_tokens", "1500", "--senses.seq_len", "32"),
        *("--senses.batch_size", "4", "--senses.block_chars", "300", "--senses.checkpoint_every", "2"),
        "--senses.keep_samples",
    ]


def _tensors(store: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(store / S.STORE_FILE))


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_teacher_dir, doc_corpus):
    """With the cap above every count, 2 gloo processes give the 1-process store exactly; with sampling
    the store is well-formed and the same for the same seed."""
    one = S.build_senses(
        str(tiny_teacher_dir),
        _cfg(doc_corpus, max_samples=5000, checkpoint_every=2, keep_samples=True),
        None,
        tmp_path / "one",
        progress=False,
        block_chars=300,
    )
    _torchrun(2, _args(tiny_teacher_dir, doc_corpus, tmp_path / "two", 5000), tmp_path)
    a, b = _tensors(one), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / S.META_FILE).read_text()) for d in (one, tmp_path / "two"))
    assert ma["counts"] == mb["counts"] and ma["corpus"] == mb["corpus"] and mb["runtime"]["processes"] == 2
    assert torch.equal(S.load_samples(one)[1], S.load_samples(tmp_path / "two")[1])
    assert not (tmp_path / ".two.partial").exists()

    # sampling: a cap of 6 is below the counts of frequent tokens
    for name in ("s1", "s2"):
        _torchrun(2, _args(tiny_teacher_dir, doc_corpus, tmp_path / name, 6), tmp_path)
    s1, s2 = _tensors(tmp_path / "s1"), _tensors(tmp_path / "s2")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    st = S.SenseStore.open(tmp_path / "s1")
    per_token = torch.tensor([int(st.counts(t).sum()) for t in range(st.vocab_size)])
    seen = torch.bincount(S.load_samples(tmp_path / "s1")[0], minlength=st.vocab_size)
    assert torch.equal(per_token, seen) and int(per_token.max()) == 6
    assert int(per_token.sum()) == st.meta["counts"]["samples"] < 1500
    assert torch.isfinite(s1["senses"].float()).all()
    assert all(st.n_senses(t) <= 3 for t in range(st.vocab_size))


@pytest.mark.parametrize("block_chars", [0, 300])
def test_corpus_streamed_twice_equals_tokens_kept(tmp_path, monkeypatch, tiny_teacher_dir, doc_corpus, block_chars):
    # A small corpus is tokenized once and kept between planning and gathering; a large one is
    # streamed (and tokenized) again. Both give the same store.
    cfg = _cfg(doc_corpus, max_tokens=900, block_chars=block_chars)  # a recipe's senses.block_chars
    kept = S.build_senses(str(tiny_teacher_dir), cfg, None, tmp_path / "kept", progress=False)
    monkeypatch.setattr(S.build, "_KEEP_TOKENS", 0)
    again = S.build_senses(str(tiny_teacher_dir), cfg, None, tmp_path / "again", progress=False)
    a, b = _tensors(kept), _tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((again / S.META_FILE).read_text())
    assert meta["counts"]["positions"] == 900 and meta["runtime"]["layout"] == ("blocks" if block_chars else "stream")
