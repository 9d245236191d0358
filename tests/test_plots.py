"""Figure 1: sentences with the words, their contextual states, the picture and its numbers."""

from __future__ import annotations

import json

import torch
from conftest import TOY_TEXT, make_model

from dskd import plots as P


def test_find_occurrences_matches_whole_lowercase_words():
    docs = iter(["Red is a colour. The reddish car was red. A red bus.\nThe bus-stop. No car here", "a car."])
    found = P.find_occurrences(docs, ["red", "bus", "car"], per_word=5)
    assert [o.text for o in found["red"]] == ["The reddish car was red.", "A red bus."]
    assert [o.text for o in found["bus"]] == ["A red bus."]  # 'bus-stop' is another word
    assert len(found["car"]) == 3
    for o in found["red"]:
        assert o.text[o.start : o.end] == "red" and o.text[o.start - 1] == " "


def test_word_states_are_the_states_predicting_the_word(tokenizer):
    model = make_model(len(tokenizer), seed=0)
    # 'zebraquux' is not in the toy vocabulary: several tokens, composed as the mean of their predicting states
    occs = [P.Occurrence("red", "the red car", 4, 7), P.Occurrence("zebraquux", "a big zebraquux is", 6, 15)]
    occs.append(P.Occurrence("red", "red car", 0, 3))  # sentence-initial: nothing predicts it, skipped
    states, used = P.word_states(model, tokenizer, occs)
    assert used == [0, 1]
    for i, o in enumerate(occs[:2]):
        ids = tokenizer(o.text)["input_ids"]
        want = tokenizer(" " + o.word, add_special_tokens=False)["input_ids"]
        start = next(j for j in range(len(ids)) if ids[j : j + len(want)] == want)
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        ref = h[start - 1 : start - 1 + len(want)].mean(0)
        torch.testing.assert_close(states[i], ref, atol=1e-5, rtol=1e-5)
    assert len(tokenizer(" zebraquux", add_special_tokens=False)["input_ids"]) > 1


def test_cli_figure_with_six_words(tmp_path, tiny_teacher_dir, capsys):
    from dskd.__main__ import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(TOY_TEXT)
    png = tmp_path / "fig.png"
    argv = ["plot", "senses", "--teacher", str(tiny_teacher_dir), "--corpus", str(corpus), "--per_word", "12"]
    assert main([*argv, "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    info = json.loads(png.with_suffix(".json").read_text())
    assert list(info["words"]) == list(P.FIGURE1_WORDS)
    assert all(info["words"][w]["states"] >= 1 for w in P.FIGURE1_WORDS)
    assert info["states"] == sum(v["states"] for v in info["words"].values())
    assert "nearest word by mean-state MSE" in capsys.readouterr().out
    assert main([*argv, "--words", "nonexistentword", "--out", str(png)]) == 2
    assert "none of" in capsys.readouterr().err
