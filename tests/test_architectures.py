"""The architecture matrix: every stage that runs part of a model, or replaces its forward, equals the
model's own full forward on each tiny family of tests/archs.py, or refuses (documented refusals only).

Sequences are 24-40 tokens, right-padded, longer than the 8-token sliding windows. Each test files its
finding in docs/architectures.md through ``archs.record`` (see tests/archs.py).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import archs
import pytest
import torch

import dskd.data as D
from dskd.config import LossConfig, from_dict
from dskd.distill import micro_batch_loss, teacher_outputs
from dskd.models import (
    freeze_except_top,
    head_at_targets_ok,
    head_problem,
    lm_head_logits,
    load_model,
    num_layers,
    truncate,
)
from dskd.prefix import PrefixMemo, prefix_states, shared_prefix_layers, split_ok, suffix_hidden

V = 96
LENGTHS = (40, 29, 33, 24)  # every one longer than the window; collated, the shorter rows are padded
STUDENT_LAYERS, TRAINABLE = 4, 2  # the planner's cache prefix is then 2

# The only refused splits, and why: these forwards do more with inputs_embeds than the layers do
SPLIT_REFUSED = {
    "gpt2": "refused: learned position embeddings are added to inputs_embeds (runs whole)",
    "granite": "refused: embedding_multiplier scales inputs_embeds (runs whole)",
}
# The shared-head KD cache (kd=head) needs logits = head(last state); scaled heads keep their logits instead
HEAD_CACHE_REFUSED = {"gemma2", "cohere", "granite"}

ALL = list(archs.ARCHS)


def seqs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g) for n in LENGTHS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these toy models: on a busy shared CPU, thread hand-offs cost 100x the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built():
    """name -> (teacher, student truncated to STUDENT_LAYERS with its top TRAINABLE layers trainable)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            teacher = archs.build(name, V)
            for p in teacher.parameters():
                p.requires_grad_(False)
            student = truncate(teacher, STUDENT_LAYERS, share=True)
            freeze_except_top(student, TRAINABLE)
            for p in student.parameters():
                if p.requires_grad:
                    p.data = p.data.clone()
            cache[name] = (teacher, student)
        return cache[name]

    return get


def batch_of(xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return D.collate(xs, 0)


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_truncation_keeps_the_bottom_layers(name, built):
    """The truncated student computes the teacher's states entering each kept layer (with the kept layers'
    own masks and rope), and the teacher's head; a multimodal model keeps its class, its text decoder cut."""
    teacher, student = built(name)
    assert type(student) is type(teacher)
    assert num_layers(student) == STUDENT_LAYERS
    b = batch_of(seqs())
    x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    hs = student(**x, output_hidden_states=True).hidden_states
    ht = teacher(**x, output_hidden_states=True).hidden_states
    real = b["attention_mask"].bool()
    for i in range(STUDENT_LAYERS):  # the state entering layer i
        assert torch.allclose(hs[i][real], ht[i][real], atol=1e-5, rtol=0), i
    archs.record(name, "truncate", "exact")


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_split_equals_whole_at_every_prefix(name, built):
    """Layers [0:n] then [n:] give the whole decoder's state at every n the planner could choose, for the
    teacher (whose split the cache runs) and the student (whose split training runs), or the split is
    refused and the cache keeps no prefix."""
    teacher, student = built(name)
    b = batch_of(seqs(1))
    x = {"attention_mask": b["attention_mask"]}
    real = b["attention_mask"].bool()
    oks = []
    for model in (teacher, student):
        dec = model.get_decoder()
        whole = dec(input_ids=b["input_ids"], **x, use_cache=False).last_hidden_state
        L = num_layers(model)
        for n in range(1, L):
            ok = split_ok(model, n)
            oks.append(ok)
            if ok:
                states = prefix_states(model, n, input_ids=b["input_ids"], **x)
                split = suffix_hidden(model, n, states, **x)
                assert torch.allclose(split[real], whole[real], atol=1e-5, rtol=0), (model.config.model_type, n)
    n_shared = shared_prefix_layers(teacher, student)
    if name in SPLIT_REFUSED:
        assert not any(oks) and n_shared == 0
        status = SPLIT_REFUSED[name]
    else:
        assert all(oks) and n_shared == STUDENT_LAYERS - TRAINABLE
        status = "exact"
    archs.record(name, "split", status)


def _losses(student, batch, t_logits, t_h, prefix, hat):
    lc = LossConfig(lam=0.0, hidden="mse", hidden_weight=0.5)
    n_tok = float((batch["labels"] != -100).sum())
    student.zero_grad(set_to_none=True)
    nc = contextlib.nullcontext()
    loss, terms, _ = micro_batch_loss(student, batch, t_logits, t_h, lc, V, n_tok, 1.0, [], None, nc, prefix, hat)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


@pytest.mark.parametrize("name", ALL)
def test_cached_kd_equals_online_kd(name, built, tmp_path):
    """The teacher cache (shared prefix and shared head as auto picks them) read back through the training
    step gives the online teacher's losses and gradients; the head at targets only changes neither."""
    teacher, student = built(name)
    student.train()
    pair = SimpleNamespace(teacher=teacher, student=student, vocab_size=V)
    if name in HEAD_CACHE_REFUSED:  # asked for, the shared head is refused in one line naming the model type
        with pytest.raises(D.CacheError, match=f"--distill.cache_kd head: {teacher.config.model_type}: .*rescales"):
            D.cache_head(from_dict({"distill": {"cache_kd": "head"}}).distill, pair)
    # auto takes the shared head where it is exact; else full logits (top-k would be approximate by design)
    kd = "logits" if name in HEAD_CACHE_REFUSED else "auto"
    cfg = from_dict({"distill": {"cache_hidden_dtype": "float32", "cache_kd": kd, "cache_topk": 0}})
    settings = D.run_cache_settings(cfg.distill, cfg.loss.T, pair)
    data = D.TokenData(seqs(2), {"hash": "h"})
    D.write_cache(tmp_path / "c", data, teacher, "fp", settings, V, batch_tokens=80, progress=False)
    cache = D.TeacherCache.open(tmp_path / "c")
    n_pre = 0 if name in SPLIT_REFUSED else STUDENT_LAYERS - TRAINABLE
    assert cache.prefix_layers == n_pre
    assert (cache.kd == "head") == (name not in HEAD_CACHE_REFUSED)
    hat = head_at_targets_ok(student)
    idx = list(range(len(data)))
    batch = batch_of([data.seqs[i] for i in idx])
    T = batch["input_ids"].shape[1]
    nc = contextlib.nullcontext()
    head = student.get_output_embeddings()
    online = _losses(student, batch, *teacher_outputs(teacher, None, idx, batch, V, nc), None, False)
    prefix = (n_pre, cache.prefix(idx, T)) if n_pre else None
    runs = {False: teacher_outputs(None, cache, idx, batch, V, nc, head=head)}
    if hat:
        runs[True] = teacher_outputs(None, cache, idx, batch, V, nc, head=head, states_only=cache.kd == "head")
    for at_targets, (t_logits, t_h) in runs.items():
        terms, grads = _losses(student, batch, t_logits, t_h, prefix, at_targets)
        assert terms.keys() == online[0].keys()
        for k in terms:
            assert terms[k] == pytest.approx(online[0][k], rel=1e-5, abs=1e-6), (k, at_targets)
        for k, g in grads.items():
            assert torch.allclose(g, online[1][k], atol=1e-6, rtol=1e-4), (k, at_targets)
    assert any(g.abs().max() > 0 for g in online[1].values())
    student.eval()
    notes = ["kd=head refused (output scaling): logits stored"] if name in HEAD_CACHE_REFUSED else []
    notes += [] if n_pre else ["no prefix stored (split refused)"]
    archs.record(name, "cached_kd", "; ".join(["exact", *notes]))
    archs.record(name, "head_at_targets", "exact" if hat else "refused: head_at_targets_ok probe fails (full head)")


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_fidelity_logits_are_the_models_own(name, built):
    """Fidelity of a model against itself has KL 0, and its NLL is the model's own logits' NLL (output
    scaling applied), also for a student served through the shared-prefix memo."""
    from dskd.fidelity import Doc, measure

    teacher, student = built(name)
    assert head_problem(teacher) is None and head_problem(student) is None
    docs = [Doc(f"d:{i}", s) for i, s in enumerate(seqs(3))]
    memo = PrefixMemo(STUDENT_LAYERS - TRAINABLE)
    sums = measure(teacher, {"self": teacher, "student": student}, docs, V, batch_tokens=80, memo=memo)
    assert sums["self"]["kl"].sum() == pytest.approx(0.0, abs=1e-5)
    assert sums["student"]["kl"].sum() > 1e-3  # the comparison is not vacuous
    for key, model in (("teacher", teacher), ("student", student)):
        for i, d in enumerate(docs):
            lp = torch.log_softmax(model(input_ids=d.ids[None]).logits[0, :-1].float(), -1)
            nll = -lp.gather(1, d.ids[1:, None]).sum()
            assert sums[key]["nll"][i] == pytest.approx(float(nll), rel=1e-4), (key, i)
    archs.record(name, "fidelity", "exact")


class _Reservoir:
    """Records what gathering files (key, state) instead of sampling."""

    def __init__(self) -> None:
        self.seen = torch.zeros(V)
        self.gen = torch.Generator().manual_seed(0)
        self.keys: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []

    def add(self, key, h, pos=None) -> None:
        self.keys.append(key)
        self.states.append(h)


@pytest.mark.parametrize("name", ALL)
def test_gathering_files_final_norm_states_under_the_argmax(name, built):
    """Sense gathering's hooked LM-head input is the last hidden state (what the sense loss compares), filed
    under the model's own argmax token."""
    from dskd.senses.build import gather_batch

    teacher, _ = built(name)
    ids = torch.stack([s[:24] for s in seqs(4)])  # (4, 24), unpadded as gathering runs
    captured: dict = {}
    hook = teacher.get_output_embeddings().register_forward_pre_hook(lambda _m, a: captured.__setitem__("h", a[0]))
    try:
        res = _Reservoir()
        gather_batch(teacher, ids, None, res, torch.zeros(0), captured)
    finally:
        hook.remove()
    with torch.no_grad():
        o = teacher(input_ids=ids, output_hidden_states=True)
    assert torch.equal(res.keys[0], o.logits.argmax(-1).reshape(-1))
    assert torch.allclose(res.states[0], o.hidden_states[-1].reshape(ids.numel(), -1).float(), atol=1e-6)
    archs.record(name, "gather", "exact")


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_export_reloads_with_equal_logits(name, built, tmp_path):
    """A (truncated) student saved as a Hugging Face folder reloads through load_model with the same logits."""
    _, student = built(name)
    student.save_pretrained(tmp_path / "s")
    again = load_model(str(tmp_path / "s"))
    assert type(again) is type(student)
    b = batch_of(seqs(5))
    x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    real = b["attention_mask"].bool()
    want, got = student(**x).logits, again(**x).logits
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)
    assert torch.allclose(lm_head_logits(again, again.get_decoder()(**x).last_hidden_state)[real], got[real], atol=1e-4)
    archs.record(name, "export", "exact")


def test_table_is_written_merged_or_refused(tmp_path, monkeypatch):
    """write_table merges the session's findings over the committed cells, and writes nothing after a failed
    session or when a cell would be empty (a new column whose test did not run for every architecture)."""
    table = tmp_path / "architectures.md"
    monkeypatch.setattr(archs, "TABLE", table)
    monkeypatch.setattr(archs, "FOUND", {})
    stages = list(archs.STAGES)
    committed = {a: dict.fromkeys(stages[:-1], "exact") for a in archs.ARCHS}  # the last column is new
    table.write_text("intro\n\n" + archs._render(committed) + "\n\nafter\n")
    before = table.read_text()
    archs.FOUND.update({a: {stages[-1]: "exact"} for a in ALL[:-1]})
    line = archs.write_table(passed=True)
    assert line.startswith("refused") and f"{ALL[-1]} / {archs.STAGES[stages[-1]]}" in line
    assert table.read_text() == before
    archs.FOUND[ALL[-1]] = {stages[-1]: "exact", stages[0]: "refused: because"}
    assert archs.write_table(passed=False).startswith("refused") and table.read_text() == before
    assert archs.write_table(passed=True).startswith("wrote")
    text = table.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n")
    cells = archs._read_table(text)
    assert cells[ALL[-1]][stages[0]] == "refused: because" and cells[ALL[0]][stages[0]] == "exact"
    assert all(cells[a].keys() == set(stages) for a in ALL)
