"""Shared fixtures: a toy byte-level BPE tokenizer and tiny Llama models built in-process.

Nothing here touches the network. ``make_tokenizer`` trains a ~600-token byte-level BPE on
``TOY_TEXT`` (so common words are single tokens written with a leading space, as in real decoders);
``make_model`` builds a 4-layer, hidden-32 Llama with seeded random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOY_WORDS = (
    "the a an of is was to and in on it that this with for as are be by at from or not "
    "hot cold warm cool good bad big small large little happy sad unhappy glad increase decrease "
    "rise fall fast slow quick light dark heavy red crimson scarlet ruby blue green bus car train "
    "house home day night water fire question answer choice what which who why when where opposite "
    "synonym word words sentence text news report people city country government market price "
)
TOY_TEXT = (
    " ".join([TOY_WORDS] * 30)
    + (
        " The opposite of hot is cold. The opposite of good is bad. A synonym of big is large. "
        "Question: Which is heavy? Answer: A. The red car and the blue bus. Prices rise and fall. "
    )
    * 20
)


def make_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with ChatML special tokens, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOY_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0, tie: bool = True):
    """A tiny Llama causal LM with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny teacher (4 layers) with the toy tokenizer, usable as a model spec."""
    d = tmp_path_factory.mktemp("tiny-teacher")
    model = make_model(len(tokenizer), layers=4, seed=0)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def packaged_model_dir() -> Path:
    """The real packaged SmolLM2 (exported on first use); for tests marked slow."""
    from dskd.assets import export_smollm2

    path, _ = export_smollm2()
    return path


@pytest.fixture(scope="session")
def tiny_artefacts(tmp_path_factory, tiny_teacher_dir) -> dict[str, Path]:
    """One of each artefact kind, built tiny through the CLI from a recipe on the tiny teacher: a corpus,
    a pairs file, the recipe, a lexicon, a sense store, a teacher cache, a distillation run (its
    ``student/`` folder) and an evaluation result JSON. Tests copy what they damage."""
    import yaml

    from dskd.__main__ import main

    d = tmp_path_factory.mktemp("artefacts")
    corpus = d / "corpus.txt"
    corpus.write_text(TOY_TEXT)
    pairs = d / "ant.txt"
    pairs.write_text("hot cold\ngood bad\nbig small\nlight dark\n")
    recipe = d / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
                "lexicon": {"sources": [f"pairs:{pairs}:ant"]},
                "senses": {"corpus": [str(corpus)], "k": 2, "max_tokens": 1500, "seq_len": 64, "key": "actual"},
                "data": {"tasks": [], "text_files": [str(corpus)], "max_length": 32},
                "loss": {"lam": 0.0},
                "distill": {"max_steps": 1, "grad_accum": 1, "save_every": 0, "cache_dir": str(d / "cache")},
                "eval": {"tasks": ["arc_easy"], "limit": 2, "bootstrap": 0},
            }
        )
    )
    c = ["--config", str(recipe)]
    paths = {
        "dir": d,
        "corpus": corpus,
        "pairs": pairs,
        "recipe": recipe,
        "lexicon": d / "lex",
        "store": d / "store",
        "cache": d / "cache",
        "run": d / "run",
        "result": d / "res.json",
        "teacher": tiny_teacher_dir,
    }
    assert main(["lexicon", "build", *c, "--out", str(paths["lexicon"]), "--quiet"]) == 0
    assert main(["senses", "build", *c, "--out", str(paths["store"])]) == 0
    assert main(["cache", "build", *c]) == 0
    assert main(["distill", *c, "--out", str(paths["run"])]) == 0
    assert main(["eval", *c, "--model", str(paths["run"]), "--out", str(paths["result"])]) == 0
    return paths


_ARCH_TABLE: list[str] = []  # what pytest_sessionfinish did with the architecture table, for the summary


def pytest_sessionfinish(session, exitstatus) -> None:
    """With DSKD_WRITE_ARCH_TABLE=1, write docs/architectures.md's table from what the matrix tests recorded
    (tests/archs.py ``write_table``); a refusal to write fails the session."""
    import sys

    archs = sys.modules.get("archs")
    if os.environ.get("DSKD_WRITE_ARCH_TABLE") != "1" or archs is None or not archs.FOUND:
        return
    line = archs.write_table(passed=exitstatus == 0 and not session.testsfailed)
    _ARCH_TABLE.append(line)
    if line.startswith("refused") and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _ARCH_TABLE:
        terminalreporter.write_sep("-", "architecture table")
        terminalreporter.write_line(line, red=line.startswith("refused"), bold=True)
