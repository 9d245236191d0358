"""Length-dependent rope (transformers' dynamic NTK and longrope): a sequence's states past the limit depend
on what it is batched or packed with, so every stage refuses such lengths in one line naming the flag.

A tiny random Phi-3 with longrope (as Phi-3.5 / Phi-4-mini ship it, original context shrunk to a few
tokens) shows the premise: packed scoring of a group that crosses the limit differs from the model's own
forward of each choice. Below the limit the same model scores exactly.
"""

from __future__ import annotations

import pytest
import torch
from fakes import ToyTask

from dskd.config import ConfigError, EvalConfig
from dskd.evaluate import score_task
from dskd.loglik import Group, _score_packed, build_groups, score_reference
from dskd.models import check_rope_length, rope_length_limit
from dskd.prompts import loglik_requests

HEAD_DIM = 16  # hidden 64 / 4 heads


def _phi3_longrope(vocab: int, original: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, Phi3Config

    cfg = Phi3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8 * original, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, original_max_position_embeddings=original,  # as Phi-3.5's config.json
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [float(i + 2) for i in range(HEAD_DIM // 2)],
        },
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for layer in model.model.layers:  # sharp attention, so the rope's frequencies show in the scores
            layer.self_attn.qkv_proj.weight.mul_(8.0)
    return model.eval()


def test_the_limit_is_read_from_the_config():
    from transformers import Gemma3TextConfig, LlamaConfig

    assert rope_length_limit(_phi3_longrope(50, 16).config) == ("longrope", 16)
    assert rope_length_limit(LlamaConfig()) is None  # default rope: positions alone
    assert rope_length_limit(LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0})) is None
    dyn = LlamaConfig(max_position_embeddings=300, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert rope_length_limit(dyn) == ("dynamic", 300)
    assert rope_length_limit(Gemma3TextConfig()) is None  # per-layer-type rope, both static
    check_rope_length(dyn, 300, "--data.max_length", "x")  # at the limit: fine
    with pytest.raises(ConfigError) as e:
        check_rope_length(dyn, 301, "--data.max_length", "training sequences")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llama: its dynamic rope changes past 300 tokens")
    assert msg.endswith("refused: --data.max_length at most 300") and e.value.flag == "data.max_length"


def test_packing_past_a_longrope_limit_is_not_the_models_own_forward():
    """Why the refusal: the packed row reaches position 21, so every choice gets the long factors; alone,
    the 2-token choice (15 positions) gets the short ones."""
    model = _phi3_longrope(97, 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (24,), generator=g).tolist()
    group = Group(0, [0, 1], ids[:14], [ids[14:16], ids[16:24]])
    packed = _score_packed(model, [group], 0, 1 << 30)[0]
    ref = score_reference(model, group)
    assert abs(packed[0] - ref[0]) > 1e-3  # the short choice: long vs short factors
    assert packed[1] == pytest.approx(ref[1], abs=1e-4)  # the long choice is long alone too
    short = Group(0, [0, 1], ids[:10], [ids[10:12], ids[12:17]])  # 14 positions at most: short factors
    assert _score_packed(model, [short], 0, 1 << 30)[0] == pytest.approx(score_reference(model, short), abs=1e-4)


def test_eval_refuses_questions_past_the_limit_and_scores_below_it(tokenizer):
    task = ToyTask()
    items = task.eval_items()

    def longest(shots: int) -> int:
        reqs = [loglik_requests(task, x, task.exemplars(x, shots), tokenizer, False) for x in items]
        return max(len(g.ctx) + max(len(c) for c in g.conts) - 1 for g in build_groups(tokenizer, reqs))

    limit = longest(0)
    assert longest(2) > limit
    model = _phi3_longrope(len(tokenizer), limit)
    res = score_task(model, tokenizer, task, items, EvalConfig(tasks=["toy"], bootstrap=10, shots=0))
    assert res["n"] == len(items) and res["packed"] is True
    with pytest.raises(ConfigError) as e:
        score_task(model, tokenizer, task, items, EvalConfig(tasks=["toy"], bootstrap=10, shots=2))
    assert str(e.value).startswith(f"phi3: its longrope rope changes past {limit} tokens")
    assert "toy questions" in str(e.value) and "--eval.shots" in str(e.value)


@pytest.mark.parametrize(
    "module, flag", [("distill", "data.max_length"), ("data", "data.max_length"), ("fidelity", "fidelity.max_length"),
                     ("senses/build", "senses.seq_len"), ("senses/coverage", "senses.seq_len")],
)  # fmt: skip
def test_every_stage_that_batches_sequences_checks_them(module, flag):
    """Each stage that loads a model to batch sequences calls the check with the flag that sets their length
    (the check itself is tested above; a stage's own end-to-end run is too slow to repeat per stage)."""
    from pathlib import Path

    import dskd

    src = (Path(dskd.__file__).parent / f"{module}.py").read_text()
    assert "check_rope_length(" in src and f'"--{flag}"' in src.split("check_rope_length(", 1)[1][:200]


def test_distill_refuses_training_sequences_past_the_limit_before_any_step(tiny_artefacts, tokenizer, tmp_path, capsys):
    from dskd.__main__ import main

    teacher = tmp_path / "phi3-longrope"
    _phi3_longrope(len(tokenizer), 32).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    argv = ["distill", "--config", str(tiny_artefacts["recipe"]), "--model.teacher", str(teacher)]
    argv += ["--model.student_layers", "1", "--loss.lam", "0", "--data.max_length", "64", "--out", str(out)]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "phi3: its longrope rope changes past 32 tokens" in err and err.endswith("--data.max_length at most 32")
    assert not (out / "checkpoints").exists() and not (out / "student").exists()
