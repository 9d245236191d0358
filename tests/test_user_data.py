"""``data.datasets``: the user's own training data (JSONL, save_to_disk folders), rendered as the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOY_TEXT

from dskd.config import ConfigError, from_dict
from dskd.data import DataError, data_recipe, dataset_windows, prompt_and_text_sequences
from dskd.distill import distill

CHAT = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes, on a clear day."}]
ROWS = [
    {"messages": CHAT},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"text": TOY_TEXT[:300]},
]


def _data(**over):
    return from_dict({"tasks": [], "max_length": 64, **over}, cls=type(from_dict({}).data), prefix="data")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("chat", [True, False])
def test_jsonl_rows_become_the_models_own_text(tokenizer, tmp_path, chat):
    f = _jsonl(tmp_path / "mine.jsonl", ROWS)
    got = [w.tolist() for w in dataset_windows(_data(datasets=[str(f)], chat=chat), tokenizer)]
    conv = tokenizer.apply_chat_template(CHAT, tokenize=False)
    pc = [{"role": "user", "content": ROWS[1]["prompt"]}, {"role": "assistant", "content": ROWS[1]["completion"]}]
    want = [_ids(tokenizer, conv, False)]  # messages: always the chat template
    if chat:
        want.append(_ids(tokenizer, tokenizer.apply_chat_template(pc, tokenize=False), False))
    else:
        want.append(_ids(tokenizer, "The capital of France is Paris.", True))
    text = _ids(tokenizer, ROWS[2]["text"], True)
    want += [text[s : s + 64] for s in range(0, len(text), 64) if len(text[s : s + 64]) >= 2]
    want = [w[s : s + 64] for w in want[:2] for s in range(0, len(w), 64)] + want[2:]
    assert got == want
    assert "<|im_start|>assistant" in conv  # the toy template, really applied


def test_a_save_to_disk_folder_gives_the_same_windows(tokenizer, tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"text": r["text"]} for r in ROWS[2:]] * 2).save_to_disk(str(folder))
    f = _jsonl(tmp_path / "same.jsonl", ROWS[2:] * 2)
    a = dataset_windows(_data(datasets=[str(folder)]), tokenizer)
    b = dataset_windows(_data(datasets=[str(f)]), tokenizer)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] and len(a) >= 2


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ('{"foo": 1}', "a row needs messages, prompt and completion, or text (it has foo)"),
        ("{not json", "not valid JSON"),
        ('{"prompt": "only a prompt"}', "prompt and completion must both be strings"),
        ('{"messages": [{"role": "user"}]}', "messages must be a non-empty list of {role, content} strings"),
        ("[1, 2]", "a row must be a JSON object, got list"),
    ],
)
def test_a_bad_row_is_one_line_naming_the_file_and_line(tokenizer, tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ROWS[2]) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        dataset_windows(_data(datasets=[str(f)]), tokenizer)
    assert str(e.value) == f"--data.datasets: {f}:3: {msg}" or str(e.value).startswith(f"--data.datasets: {f}:3: {msg}")
    assert "\n" not in str(e.value)


def test_missing_sources_and_the_recipe(tokenizer, tmp_path):
    with pytest.raises(DataError, match="^--data.datasets: no such file or folder: ./nope.jsonl$"):
        dataset_windows(_data(datasets=["./nope.jsonl"]), tokenizer)
    with pytest.raises(DataError, match=r"a file must be \.jsonl"):
        dataset_windows(_data(datasets=[str(_jsonl(tmp_path / "x.txt", ROWS))]), tokenizer)
    with pytest.raises(ConfigError, match="needs tasks, data.text_files or data.datasets"):
        _data()
    f = _jsonl(tmp_path / "mine.jsonl", ROWS)
    plain = data_recipe(_data(text_files=[str(f)]), "tok", "teacher")
    assert "datasets" not in plain["data"]  # the recipes (and cache keys) of earlier runs are unchanged
    mine = data_recipe(_data(datasets=[str(f)]), "tok", "teacher")
    _jsonl(f, ROWS[:2])
    assert data_recipe(_data(datasets=[str(f)]), "tok", "teacher")["hash"] != mine["hash"]  # content counts
    prompts, windows = prompt_and_text_sequences(_data(datasets=[str(f)]), tokenizer)
    assert prompts == [] and len(windows) == 2


def test_a_student_trains_on_the_users_data_alone(tiny_teacher_dir, tmp_path):
    f = _jsonl(tmp_path / "mine.jsonl", ROWS * 3)
    cfg = from_dict(
        {
            "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
            "data": {"tasks": [], "datasets": [str(f)], "max_length": 48},
            "loss": {"lam": 0.0},
            "distill": {"batch_size": 1, "grad_accum": 2, "max_steps": 2, "log_every": 1, "save_every": 0},
        }
    )
    out = distill(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    recipe = json.loads((out / "data" / "recipe.json").read_text())
    assert recipe["data"]["datasets"] == [str(f)] and len(recipe["dataset_hashes"]) == 1
