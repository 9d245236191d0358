"""The architecture matrix: tiny random-weight causal LMs of every decoder family the project meets.

Each entry builds, in-process and without the network, a model of that family's real structure at
toy size: 6 decoder layers, hidden 64, and (where the family has one) a sliding window of 8 tokens,
shorter than the test sequences, with per-layer attention types and rope bases as the real configs
set them. ``build(name, vocab_size)`` returns the model in eval mode with seeded weights.

Stage tests parametrize over :data:`ARCHS`; :data:`SLIDING` names the families with a window, and
:data:`MULTIMODAL` the ones whose text model sits under ``text_config``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HIDDEN = 64
LAYERS = 6
WINDOW = 8  # shorter than every test sequence, so sliding-window layers really slide


def _common(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _llama(v):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(v))


def _mistral(v):
    from transformers import MistralConfig

    return MistralConfig(**_common(v), sliding_window=WINDOW)


def _qwen2(v):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(v))


def _qwen2_sliding(v):
    from transformers import Qwen2Config

    # the top layers slide when use_sliding_window (max_window_layers counts the full-attention ones)
    return Qwen2Config(**_common(v), use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3)


def _qwen3(v):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(v), head_dim=16)


def _gemma(v):
    from transformers import GemmaConfig

    return GemmaConfig(**_common(v), head_dim=16)


def _gemma2(v):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(v), head_dim=16, sliding_window=WINDOW, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    )


def _gemma3_text(v):
    from transformers import Gemma3TextConfig

    types = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    return Gemma3TextConfig(**_common(v), head_dim=16, sliding_window=WINDOW, layer_types=types)


def _gemma3_mm(v):
    from transformers import Gemma3Config, SiglipVisionConfig

    text = _gemma3_text(v).to_dict()
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)


def _phi3(v):
    from transformers import Phi3Config

    return Phi3Config(**_common(v), sliding_window=WINDOW)


def _olmo2(v):
    from transformers import Olmo2Config

    return Olmo2Config(**_common(v))


def _olmo3(v):
    from transformers import Olmo3Config

    types = ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] + ["full_attention"]
    return Olmo3Config(**_common(v), sliding_window=WINDOW, layer_types=types)


def _gpt_neox(v):
    from transformers import GPTNeoXConfig

    c = _common(v)
    c.pop("num_key_value_heads")
    c["tie_word_embeddings"] = False
    return GPTNeoXConfig(**c)


def _gpt2(v):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=v,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=512,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # deterministic in train mode, as the other families
    )


def _cohere(v):
    from transformers import CohereConfig

    return CohereConfig(**_common(v), logit_scale=0.5)


def _granite(v):
    from transformers import GraniteConfig

    return GraniteConfig(
        **_common(v), logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25
    )


def _mixtral(v):
    from transformers import MixtralConfig

    return MixtralConfig(**_common(v), num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def _gpt_oss(v):
    from transformers import GptOssConfig

    c = _common(v)
    c["tie_word_embeddings"] = False
    types = ["sliding_attention", "full_attention"] * (LAYERS // 2)
    return GptOssConfig(
        **c, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, layer_types=types
    )


# name -> config factory (vocab_size -> PretrainedConfig)
ARCHS: dict[str, Callable[[int], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen2-sliding": _qwen2_sliding,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3-text": _gemma3_text,
    "gemma3-mm": _gemma3_mm,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "olmo3": _olmo3,
    "gpt-neox": _gpt_neox,
    "gpt2": _gpt2,
    "cohere": _cohere,
    "granite": _granite,
    "mixtral": _mixtral,
    "gpt-oss": _gpt_oss,
}
SLIDING = {"mistral", "qwen2-sliding", "gemma2", "gemma3-text", "gemma3-mm", "phi3", "olmo3", "gpt-oss"}
MULTIMODAL = {"gemma3-mm"}


def config(name: str, vocab_size: int):
    """The family's config at toy size (see the module docstring)."""
    return ARCHS[name](vocab_size)


def build(name: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of family ``name`` (float32, eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    cfg = config(name, vocab_size)
    torch.manual_seed(seed)
    if name in MULTIMODAL:
        model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    # random init leaves norms at 1 and biases at 0: perturb everything so a skipped or misplaced
    # weight changes the output
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------- the stage table
#
# docs/architectures.md lists, per architecture, what each stage does: "exact" or "refused: <reason>".
# A stage test calls record(name, stage, status) with what it found. By default the committed table must
# already say that (a changed behaviour fails the test until the table is regenerated). With the
# environment variable DSKD_WRITE_ARCH_TABLE=1 the findings are collected instead, and tests/conftest.py
# hands them to write_table() when the session ends: it merges them over the committed cells (a stage or
# architecture not run keeps its committed cell, which every ordinary run still checks) and writes the
# table only if the session passed and no cell would be empty. Another test file adds a column by adding
# its stage to STAGES and calling record().

STAGES: dict[str, str] = {  # stage key -> column title, in table order
    "truncate": "truncation",
    "split": "prefix split (teacher and student)",
    "cached_kd": "cached == online KD",
    "head_at_targets": "head at targets",
    "fidelity": "fidelity logits",
    "gather": "gathering",
    "export": "export + reload",
    "packed_scoring": "packed scoring",  # tests/test_arch_scoring.py
}
TABLE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
_BEGIN, _END = "<!-- arch-table:begin -->", "<!-- arch-table:end -->"
WRITE_ENV = "DSKD_WRITE_ARCH_TABLE"
FOUND: dict[str, dict[str, str]] = {}  # what this session's tests recorded, with WRITE_ENV=1: {arch: {stage: cell}}


def _read_table(text: str) -> dict[str, dict[str, str]]:
    """{arch: {stage: cell}} from the table between the markers (empty when there is none)."""
    if _BEGIN not in text:
        return {}
    body = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines() if "|" in line]
    if len(rows) < 2:
        return {}
    title_to_stage = {t: k for k, t in STAGES.items()}
    stages = [title_to_stage.get(t) for t in rows[0][1:]]
    return {r[0].strip("`"): {s: c for s, c in zip(stages, r[1:], strict=False) if s and c} for r in rows[2:]}


def _render(cells: dict[str, dict[str, str]]) -> str:
    head = "| architecture | " + " | ".join(STAGES.values()) + " |"
    rule = "|---" * (len(STAGES) + 1) + "|"
    rows = [f"| `{a}` | " + " | ".join(cells.get(a, {}).get(s, "") for s in STAGES) + " |" for a in ARCHS]
    return "\n".join([_BEGIN, head, rule, *rows, _END])


def record(name: str, stage: str, status: str) -> None:
    """File what a stage test found for architecture ``name``: ``exact[; notes]`` or ``refused: <reason>``.

    Checks it against the committed table, or with DSKD_WRITE_ARCH_TABLE=1 keeps it for
    :func:`write_table` at the end of the session.
    """
    import os

    assert name in ARCHS, name
    assert stage in STAGES, stage
    assert status.startswith(("exact", "refused: ")), status
    assert "|" not in status and "\n" not in status, status  # one table cell
    if os.environ.get(WRITE_ENV) == "1":
        assert FOUND.get(name, {}).get(stage, status) == status, (name, stage, FOUND[name][stage], status)
        FOUND.setdefault(name, {})[stage] = status
        return
    committed = _read_table(TABLE.read_text() if TABLE.is_file() else "").get(name, {}).get(stage)
    assert committed == status, (
        f"docs/architectures.md says {committed!r} for {name} / {STAGES[stage]}, the test finds {status!r}: "
        f"regenerate it with {WRITE_ENV}=1 pytest tests/test_architectures.py tests/test_arch_scoring.py"
    )


def write_table(passed: bool) -> str:
    """Write this session's findings (:data:`FOUND`) into docs/architectures.md, merged over its committed cells.

    Refuses (writes nothing) when the session did not pass, or when a cell would be empty (a stage that
    no committed table has yet and whose test did not run for every architecture). Returns one line saying
    what it did, starting with ``refused`` when it wrote nothing.
    """
    if not passed:
        return f"refused to write {TABLE.name}: the session had failures (the table is written from a passing run)"
    text = TABLE.read_text() if TABLE.is_file() else ""
    cells = _read_table(text)
    for name, found in FOUND.items():
        cells.setdefault(name, {}).update(found)
    missing = [f"{a} / {STAGES[s]}" for a in ARCHS for s in STAGES if not cells.get(a, {}).get(s)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return (
            f"refused to write {TABLE.name}: no finding for {', '.join(missing[:5])}{more}; run "
            "tests/test_architectures.py and tests/test_arch_scoring.py together"
        )
    table = _render(cells)
    text = text.split(_BEGIN, 1)[0] + table + text.split(_END, 1)[1] if _BEGIN in text else text + "\n" + table + "\n"
    tmp = TABLE.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(TABLE)
    n = sum(len(f) for f in FOUND.values())
    return f"wrote {TABLE.name}: {n} cells found by this session, {len(ARCHS) * len(STAGES) - n} kept from the table"
