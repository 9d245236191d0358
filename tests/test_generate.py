"""Generative scoring: batched greedy decoding, stop sequences, answer parsing, SQuAD metrics, presets."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from dskd.__main__ import main as dskd_main
from dskd.config import ConfigError, EvalConfig
from dskd.evaluate import evaluate, markdown_table, score_task
from dskd.generate import (
    StopOnStrings,
    encode_prompts,
    exact_match,
    generate_texts,
    generation_prompt,
    normalize_answer,
    parse_choice,
    squad_scores,
    token_f1,
)
from dskd.presets import PRESETS, check_chat, check_paper, paper_config, plan, preset_items, task_configs
from dskd.prompts import subject_quota
from dskd.tasks import Item, Task, get_task

PROMPTS = [
    "The opposite of hot is",
    "Question: Which is heavy? Answer:",
    "red car",
    "The opposite of good is bad. A synonym of big is large. Prices",
    "water",
]


@pytest.fixture(scope="module")
def lm(tokenizer):
    """A tiny Llama whose greedy continuations vary (untied head, larger weights), in float64 so
    that batching changes nothing beyond rounding far below any argmax margin."""
    model = make_model(len(tokenizer), layers=2, seed=3, tie=False).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    return model


def test_left_padded_batches_generate_what_each_prompt_generates_alone(lm, tokenizer):
    batched = generate_texts(lm, tokenizer, PROMPTS, 10, stop=["zzz"], batch_size=5)
    alone = [generate_texts(lm, tokenizer, [p], 10, stop=["zzz"], batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(alone)) == len(alone) and all(alone)  # non-degenerate: the check can tell rows apart
    # the same batch without the attention mask (padding attended) decodes differently: the test can fail
    ids = encode_prompts(tokenizer, PROMPTS)
    T = max(len(x) for x in ids)
    x = torch.tensor([[tokenizer.pad_token_id] * (T - len(i)) + i for i in ids])
    gen = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    assert tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True) != alone


def test_stop_sequences_cut_the_text_and_the_budget_bounds_it(lm, tokenizer):
    full = generate_texts(lm, tokenizer, PROMPTS, 12, stop=["zzz"])
    short = generate_texts(lm, tokenizer, PROMPTS, 3, stop=["zzz"])
    for f, s in zip(full, short, strict=True):
        assert f.startswith(s) and len(s) < len(f)
    # a stop sequence taken from the middle of a generation: the text ends right before it
    text = full[3]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = generate_texts(lm, tokenizer, [PROMPTS[3]], 12, stop=[stop])[0]
    assert cut == text.split(stop)[0]


def test_stop_criterion_marks_rows_whose_new_text_holds_a_stop(tokenizer):
    prompt = tokenizer("red car", add_special_tokens=False)["input_ids"]
    a = tokenizer(" The opposite", add_special_tokens=False)["input_ids"]
    b = tokenizer(" hot is cold", add_special_tokens=False)["input_ids"]
    n = min(len(a), len(b))
    ids = torch.tensor([prompt + a[:n], prompt + b[:n]])
    crit = StopOnStrings(tokenizer, ["opp", "\n"], len(prompt))
    assert crit(ids, None).tolist() == [True, False]
    # the prompt itself is never searched
    assert StopOnStrings(tokenizer, ["car"], len(prompt))(ids, None).tolist() == [False, False]


def test_budget_zero_is_refused():
    with pytest.raises(ConfigError, match="--eval.max_new_tokens"):
        EvalConfig(scoring="generate", max_new_tokens=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        (" B.", 1),
        ("B) fire", 1),
        ("(C)", 2),
        ("**D**", 3),
        ("A. fire", 0),
        ("Answer: C", 2),
        ("The answer is B.", 1),
        ("the correct option is (d)", None),  # lower-case letters are not labels
        ("The correct option is (D)", 3),
        ("\n  C\nbecause", 2),
        ("E", None),  # a letter the prompt did not show
        ("Bus", None),  # a word, not a label
        ("I think B", None),  # the label must come first
        ("", None),
        ("3", None),  # a number is a label only when the prompt numbered its choices
    ],
)
def test_parse_choice_rule(text, expected):
    assert parse_choice(text, ["A", "B", "C", "D"]) == expected


def test_parse_choice_with_numbered_labels():
    assert parse_choice("2. the train", ["1", "2"]) == 1
    assert parse_choice("12", ["1", "2"]) is None
    assert parse_choice("B", ["1", "2"]) is None


def test_squad_normalisation_and_f1_golden_values():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred {cat, sat, on, mat}, gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: pred {23, 23, years}, gold {23}: P = 1/3, R = 1
    assert token_f1("23 23 years", "23") == pytest.approx(0.5)
    assert token_f1("Denver Broncos", "Carolina Panthers") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "Denver") == 0.0
    em, f1 = squad_scores("Denver Broncos won", ["Carolina", "Denver Broncos", "the Broncos"])
    assert em == 0.0 and f1 == pytest.approx(0.8)  # best gold: "Denver Broncos" (P 2/3, R 1)
    assert squad_scores("Broncos", ["Denver Broncos", "the Broncos"]) == (1.0, 1.0)


def test_squad_halves_share_no_article_or_passage():
    task = get_task("squad")
    train, ev = task.train_items(), task.eval_items()
    assert len(train) + len(ev) == 1000 and train and ev
    assert not {x.subject for x in train} & {x.subject for x in ev}
    assert not {x.context for x in train} & {x.context for x in ev}
    assert not {x.id for x in train} & {x.id for x in ev}
    assert all(x.answers and x.context and x.question and not x.choices for x in train + ev)
    for x in ev[:20]:
        assert all(s.subject != x.subject for s in task.exemplars(x, 1))


class ToyMc(Task):
    name = "toy_mc"
    title = "Toy MC"
    protocol = "hand-made"

    def _load(self, part: str) -> list[Item]:
        qs = [("Which is hot?", ("fire", "water")), ("Which is fast?", ("a slow bus", "the quick train", "day"))]
        return [Item(f"{part}{i}", f"{part}: {q} ({i})", c, i % len(c)) for i, (q, c) in enumerate(qs * 3)]


class ToyQa(Task):
    name = "toy_qa"
    title = "Toy QA"
    kind = "qa"
    protocol = "hand-made"

    def _load(self, part: str) -> list[Item]:
        ctx = "The red car is fast. The blue bus is slow."
        qs = [("Which car is fast?", ("the red car", "red car")), ("Which is slow?", ("the blue bus",))]
        qs = qs if part == "eval" else [(q.replace("Which", "What"), a) for q, a in qs]
        return [Item(f"{part}{i}", q, (), -1, subject="Cars", context=ctx, answers=a) for i, (q, a) in enumerate(qs)]

    def qa_block(self, item: Item) -> str:
        return f"Title: {item.subject}\nBackground: {item.context}\nQuestion: {item.question}\nAnswer:"


def test_generate_scoring_entries(lm, tokenizer):
    cfg = EvalConfig(tasks=["x"], scoring="generate", shots=1, chat=True, max_new_tokens=4, bootstrap=20)
    mc = ToyMc()
    e = score_task(lm, tokenizer, mc, mc.eval_items(), cfg)
    items = e["items"]
    assert e["primary"] == "acc" and len(items["generation"]) == 6
    assert e["metrics"]["unparseable"] == pytest.approx(sum(p < 0 for p in items["pred"]) / 6)
    assert e["metrics"]["acc"] == pytest.approx(
        sum(p == g for p, g in zip(items["pred"], items["gold"], strict=True)) / 6
    )
    for text, p in zip(items["generation"], items["pred"], strict=True):
        assert p == (parse_choice(text, ["A", "B", "C"]) if parse_choice(text, ["A", "B", "C"]) is not None else -1)
    assert "5-shot" not in e["setup"] and "1-shot chat, greedy generation" in e["setup"]
    qa = ToyQa()
    e = score_task(lm, tokenizer, qa, qa.eval_items(), cfg)
    assert e["primary"] == "f1" and set(e["metrics"]) >= {"em", "f1", "f1_stderr"}
    for text, golds, f1 in zip(e["items"]["generation"], e["items"]["gold"], e["items"]["f1"], strict=True):
        assert f1 == squad_scores(text, golds)[1]


def test_qa_prompts(tokenizer):
    qa = ToyQa()
    x, shot = qa.eval_items()[0], qa.train_items()[1]
    plain = generation_prompt(qa, x, [shot], tokenizer, chat=False)
    assert plain.endswith("Question: Which car is fast?\nAnswer:")
    assert "Question: What is slow?\nAnswer: the blue bus\n\nTitle: Cars" in plain
    chat = generation_prompt(qa, x, [shot], tokenizer, chat=True)
    assert chat.startswith("<|im_start|>user\nAnswer the question") and chat.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nthe blue bus<|im_end|>" in chat


def test_paper_preset_resolution():
    cfg = EvalConfig(preset="paper", limit=30, batch_size=3)
    got = {name: (c.shots, c.chat, c.scoring, c.batch_size) for name, c in task_configs(cfg)}
    assert got == {
        "arc_challenge": (5, True, "generate", 3),
        "csqa": (5, True, "generate", 3),
        "piqa": (5, True, "generate", 3),
        "mmlu": (5, True, "generate", 3),
        "squad": (1, True, "generate", 3),
    }
    work = {t.name: items for t, items, _ in plan(cfg)}
    assert all(len(v) == 30 for v in work.values())
    assert len({x.subject for x in work["mmlu"]}) == 30  # spread over subjects, one each
    assert len(preset_items(get_task("mmlu"), 120)) == 120
    assert {x.subject for x in preset_items(get_task("mmlu"), 120)} == {
        x.subject for x in get_task("mmlu").eval_items()
    }
    mmlu = get_task("mmlu")
    x = work["mmlu"][0]
    dev = [s for s in mmlu.train_items() if s.subject == x.subject and "/dev/" in s.id]
    assert mmlu.exemplars(x, 5) == dev[:5]  # 5-shot from the subject's dev set
    assert sum(subject_quota(list(range(57)), 20).values()) == 20
    assert set(subject_quota(list(range(57)), 120).values()) == {2, 3}
    assert paper_config(EvalConfig(paper_limit=-1)) is None
    assert paper_config(EvalConfig(paper_limit=7)).limit == 7 and paper_config(EvalConfig()).preset == "paper"
    assert set(PRESETS) == {"paper"}


def test_errors_name_the_flag_before_any_model_loads(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    import dskd.models

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(dskd.models, "load_model", no_load)
    with pytest.raises(ConfigError, match="--eval.preset: unknown preset"):
        EvalConfig(preset="papr")
    assert dskd_main(["eval", "--eval.preset", "papr", "--out", str(tmp_path / "x.json")]) == 2
    assert "--eval.preset: unknown preset" in capsys.readouterr().err
    assert dskd_main(["eval", "--eval.max_new_tokens", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--eval.max_new_tokens: the generation budget must be >= 1" in capsys.readouterr().err
    assert dskd_main(["eval", "--max-new-tokens", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "did you mean --eval.max_new_tokens" in capsys.readouterr().err  # the old spelling points to the new
    with pytest.raises(ConfigError, match="--eval.scoring: squad is extractive QA"):
        evaluate(str(tiny_teacher_dir), EvalConfig(tasks=["squad"]), tmp_path / "x.json")
    with pytest.raises(Exception, match="--eval.tasks: unknown task 'squda'; did you mean squad"):
        evaluate(str(tiny_teacher_dir), EvalConfig(tasks=["squda"], scoring="generate"), tmp_path / "x.json")
    # a tokenizer without a chat template asked for the paper preset's chat prompts
    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.chat_template = None
    tok.save_pretrained(plain)
    for f in tiny_teacher_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (plain / f.name).write_bytes(f.read_bytes())
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="--eval.chat: this tokenizer has no chat template, but --eval.preset paper"):
        evaluate(str(plain), EvalConfig(preset="paper", limit=1), tmp_path / "x.json")
    # the main job refuses before any stage runs, naming the field that skips the protocol
    with pytest.raises(ConfigError, match="--eval.paper_limit: --eval.chat: this tokenizer has no chat template"):
        check_paper(EvalConfig(paper_limit=3), str(plain))
    check_paper(EvalConfig(paper_limit=-1), str(plain))
    check_paper(EvalConfig(paper_limit=3), str(tiny_teacher_dir))
    with pytest.raises(ConfigError, match="use --eval.chat false"):
        check_chat(tok, [(ToyMc(), [], EvalConfig(chat=True))])
    assert not (tmp_path / "x.json").exists()


def test_eval_cli_with_the_paper_preset(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "paper.json"
    args = ["eval", "--model", str(tiny_teacher_dir), "--eval.preset", "paper", "--eval.limit", "2"]
    args += ["--eval.max_new_tokens", "3"]
    assert dskd_main([*args, "--eval.bootstrap", "10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["arc_challenge", "csqa", "piqa", "mmlu", "squad"]
    assert res["tasks"]["squad"]["primary"] == "f1" and res["tasks"]["mmlu"]["n"] == 2
    assert all(e["max_new_tokens"] == 3 for e in res["tasks"].values())
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(res)
    assert "| 5-shot chat, greedy generation, answer letter |" in table and "| arc_challenge | 2 |" in table
    assert "| 1-shot chat, greedy generation, token F1 / exact match |" in table and "| squad | 2 |" in table
    from dskd.report import report

    text = report([out, out], baseline="paper")
    assert "- squad: 1-shot chat, greedy generation, token F1 / exact match (f1)" in text
    assert "(Δ +0.00" in text
