"""The teacher cache pass: batched greedy continuations, the fused 1-token continuation, the shared-head
check that makes cached KD exact, and refusing caches of an older format."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from safetensors import safe_open

from dskd.config import from_dict
from dskd.data import (
    CacheError,
    TeacherCache,
    TokenData,
    build_teacher_cache,
    cache_settings,
    collate,
    greedy_continuations,
    write_cache,
)
from dskd.models import freeze_except_top, shared_head_problem, truncate


@torch.no_grad()
def one_at_a_time(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: greedy decoding of one prompt, a full forward per token, no padding, no KV cache."""
    x = ids[None]
    for _ in range(n):
        x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids) :]


def prompts(vocab: int, n: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 4])
def test_batched_greedy_continuations_equal_one_prompt_at_a_time(n):
    model = make_model(300, layers=2, seed=3)
    ps = prompts(300)
    got = greedy_continuations(model, ps, n, pad_id=2, batch_size=3)  # left-padded batches of mixed lengths
    for p, c in zip(ps, got, strict=True):
        assert torch.equal(c, one_at_a_time(model, p, n))
    assert all(c.numel() == 0 for c in greedy_continuations(model, ps, 0, pad_id=2))


def _pair(vocab: int):
    teacher = make_model(vocab, layers=4, seed=0)
    student = truncate(teacher, 2)
    freeze_except_top(student, 1)
    return teacher, student


@pytest.mark.parametrize("kd", ["head", "topk"])
def test_one_pass_fills_the_cache_and_takes_the_continuation(kd, tmp_path):
    """Prompts get their 1-token continuation from the cache's own forward; rows equal a plain forward."""
    V = 300
    teacher, student = _pair(V)
    ps = prompts(V, n=6, seed=1)
    windows = prompts(V, n=3, seed=2)
    data = TokenData([p.clone() for p in ps] + [w.clone() for w in windows], {"hash": "h"})
    cfg = from_dict({"distill": {"cache_hidden_dtype": "float32", "cache_topk": 16}})
    settings = cache_settings(cfg.distill, cfg.loss.T, V, "probe" if kd == "head" else None)
    out = write_cache(
        tmp_path / "c",
        data,
        teacher,
        "fp",
        settings,
        V,
        batch_tokens=40,  # several batches
        progress=False,
        continue_prompts=[True] * len(ps) + [False] * len(windows),
    )
    conts = greedy_continuations(teacher, ps, 1, pad_id=2)
    assert [len(s) for s in data.seqs] == [len(p) + 1 for p in ps] + [len(w) for w in windows]
    for s, p, c in zip(data.seqs, ps, conts, strict=False):
        assert torch.equal(s, torch.cat([p, c]))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["positions"] == sum(len(s) - 1 for s in data.seqs)  # target positions only
    assert meta["tokens_per_s"] > 0
    with safe_open(str(out / meta["shards"][0]), framework="pt") as f:
        assert set(f.keys()) == ({"hidden"} if kd == "head" else {"hidden", "topk_ids", "topk_logp", "rest_logp"})
    cache = TeacherCache.open(out)
    assert all(torch.equal(a, b) for a, b in zip(cache.data.seqs, data.seqs, strict=True))
    idx = [0, len(ps)]  # a prompt and a text window
    batch = collate([data.seqs[i] for i in idx], 2)
    logits, hidden = cache.get(idx, batch["input_ids"].shape[1])
    with torch.no_grad():
        o = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    mask = batch["labels"] != -100
    assert torch.allclose(hidden[mask], o.hidden_states[-1][mask], atol=1e-5)
    assert (hidden[~mask] == 0).all()  # the last position and padding have no target and no row
    if kd == "head":
        assert logits is None
        assert torch.allclose(student.get_output_embeddings()(hidden)[mask], o.logits[mask], atol=1e-4)
    else:
        assert logits.ids.shape[-1] == 16 and meta["tail_mass"]["mean"] > 0


def test_shared_head_is_detected_on_weights_and_on_the_logits():
    V = 300
    teacher, student = _pair(V)
    assert shared_head_problem(teacher, student, V) is None
    other = make_model(V, layers=2, seed=5)
    freeze_except_top(other, 1)
    assert "differs" in shared_head_problem(teacher, other, V)
    student.get_output_embeddings().weight.requires_grad_(True)
    assert "trainable" in shared_head_problem(teacher, student, V)


def test_soft_capped_logits_are_not_recomputed_from_the_head():
    """Gemma-2 soft-caps its logits: the head alone does not give them, and the check says so."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.5,  # small, so the cap bends every logit
    )
    torch.manual_seed(0)
    teacher = Gemma2ForCausalLM(cfg).eval()
    student = truncate(teacher, 1)
    freeze_except_top(student, 1)
    assert (
        shared_head_problem(teacher, student, 300)
    ) == "gemma2: the teacher's forward rescales its LM head's output (final_logit_softcapping)"


def _independent_student_cfg(tiny_teacher_dir, tokenizer, tmp_path, text_file, **distill):
    d = tmp_path / "student"
    make_model(len(tokenizer), layers=2, seed=7).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return from_dict(
        {
            "model": {"teacher": str(tiny_teacher_dir), "student": str(d), "trainable_layers": 1},
            "data": {"tasks": [], "text_files": [str(text_file)], "max_length": 32},
            "distill": {"cache_topk": 8, **distill},
        }
    )


def test_a_student_with_its_own_head_gets_top_k_logits(tiny_teacher_dir, tokenizer, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the red car and the blue bus. " * 20 + "\n\n" + "hot and cold water. " * 20)
    cfg = _independent_student_cfg(tiny_teacher_dir, tokenizer, tmp_path, text)
    out = build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, tmp_path / "cache")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["kd"] == "topk" and 0 < meta["tail_mass"]["mean"] < 1
    assert "top-8" in capsys.readouterr().out
    with pytest.raises(CacheError, match="--distill.cache_kd head"):
        bad = _independent_student_cfg(tiny_teacher_dir, tokenizer, tmp_path, text, cache_kd="head")
        build_teacher_cache(bad.model, bad.data, bad.distill, bad.loss.T, run_dir=bad.out_dir)


def test_a_cache_of_an_older_format_is_refused(tiny_teacher_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the red car and the blue bus. " * 10)
    cfg = from_dict(
        {
            "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
            "data": {"tasks": [], "text_files": [str(text)], "max_length": 32},
        }
    )
    out = build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, tmp_path / "cache")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["kd"] == "head"
    meta["format"]["version"] = 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format version 1"):
        TeacherCache.open(out)


def test_prompt_styles_ask_the_same_training_questions(tokenizer):
    """``data.style``: letter prompts end in ``Answer:`` after lettered choices; cloze prompts end in the
    question as log-likelihood scoring asks it, the exemplar solved with its answer text."""
    from dskd.data import task_prompts
    from dskd.tasks import get_task

    base = {"data": {"tasks": ["arc_easy"], "shots": 1, "max_items": 3, "chat": False}}
    letter = task_prompts(from_dict(base).data, tokenizer)
    cloze = task_prompts(from_dict({"data": {**base["data"], "style": "cloze"}}).data, tokenizer)
    assert len(letter) == len(cloze) == 3
    train = get_task("arc_easy").train_items()
    for lp, cp in zip(letter, cloze, strict=True):
        assert lp.endswith("Answer:") and "\nA. " in lp
        assert cp.endswith("Answer:") and "\nA. " not in cp
        # the same item (same seeded sample): the last question is the same text in both styles
        assert lp.split("Question: ")[-1].split("\n")[0] == cp.split("Question: ")[-1].split("\n")[0]
        # the exemplar is solved with the gold answer text, never a letter
        exemplar = cp.split("\n\n")[0]
        assert any(exemplar == get_task("arc_easy").cloze_example(x) for x in train)
    with pytest.raises(Exception, match="data.style"):
        from_dict({"data": {"style": "fill"}})
