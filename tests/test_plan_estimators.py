"""``dskd plan``'s per-stage estimators against what the code builds or allocates: the sense store's bytes
against a store built in-process, the trained tensors against a real optimiser's, the logits working set
against a live-tensor count of one real training step, DDP's buckets against torch's Reducer, the memo cap
against ``PrefixMemo``. (The teacher cache against a built one: tests/test_plan.py.)"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import TOY_TEXT, make_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dskd import plan as P
from dskd.config import from_dict


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated inside the block and still alive, and their peak (CPU memory has no
    allocator counter: each op's new output storages are counted until they are freed)."""

    def __init__(self, *existing: torch.nn.Module | torch.Tensor) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, weakref.ref] = {}
        # storages made before the block (weights, inputs) are not counted when an op returns a view of them
        self._old = {
            t.untyped_storage().data_ptr()
            for x in existing
            for t in (list(x.parameters()) + list(x.buffers()) if isinstance(x, torch.nn.Module) else [x])
        }

    def _gone(self, key: int, n: int) -> None:
        self._seen.pop(key, None)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self._seen and key not in self._old:
                    self._seen[key] = weakref.ref(st, lambda _r, k=key, n=n: self._gone(k, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def _counts(**kw) -> P.DataCounts:
    base = {"sequences": 4, "positions": 100, "eval_items": 10, "eval_tokens": 1000, "exact": True}
    return P.DataCounts(**{**base, **kw})


def _recipe(teacher: Path, **sections):
    d = {
        "model": {"teacher": str(teacher), "student_layers": 3, "trainable_layers": 1},
        "data": {"tasks": ["arc_easy"], "max_length": 24},
        "eval": {"tasks": ["arc_easy"], "limit": 3},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return from_dict(d)


def test_the_plan_is_the_table_of_estimators(tiny_teacher_dir):
    cfg = _recipe(tiny_teacher_dir, distill={"teacher_cache": True})
    sh = P.shapes(cfg, ["--config", "c.yaml"], counts=_counts())
    plan = P.make_plan(cfg, ["--config", "c.yaml"], counts=_counts())
    names = [st.name for est in P.STAGES for st in est(cfg, sh)]
    assert [st["name"] for st in plan["stages"]] == names == ["senses", "cache", "distill:dskd", "distill:kd", "eval"]
    assert "cache" not in [
        st.name for est in P.STAGES for st in est(_recipe(tiny_teacher_dir, distill={"teacher_cache": False}), sh)
    ]


def test_sense_store_bytes_against_a_built_store(tmp_path, tiny_teacher_dir):
    from safetensors import safe_open

    from dskd import senses as S
    from dskd.senses.store import STORE_FILE

    corpus = tmp_path / "a.txt"
    corpus.write_text(TOY_TEXT)
    senses = {"corpus": [str(corpus)], "k": 3, "max_samples": 40, "max_tokens": 2500, "seq_len": 64, "batch_size": 4}
    cfg = _recipe(tiny_teacher_dir, senses=senses)
    out = S.build_senses(str(tiny_teacher_dir), cfg.senses, None, tmp_path / "store", progress=False)
    with safe_open(str(out / STORE_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    built = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    rows, dim = tensors["senses"].shape
    entries, spans = tensors["offsets"].numel() - 1, tensors["spans"].shape[0]
    # the file's formula, exact, from the built store's counts
    assert P.store_file_bytes(rows, entries, spans, dim, tensors["senses"].element_size()) == sum(built.values())
    # the plan's bound, from the recipe alone (no lexicon: no spans), holds the built senses
    sh = P.shapes(cfg, [], counts=_counts())
    planned = P.sense_store_bytes(cfg, sh)
    assert built["senses"] <= planned
    assert planned == min(sh.t.vocab, cfg.senses.max_tokens) * cfg.senses.k * dim * 2


def test_trained_tensor_bytes_against_the_real_optimiser(tmp_path, tokenizer):
    """The trained weights, their gradients and AdamW's moments, as distill.setup makes them."""
    from dskd.distill import setup

    folder = tmp_path / "teacher"
    make_model(len(tokenizer), layers=4, seed=0, tie=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(TOY_TEXT[:1500])
    cfg = _recipe(
        folder,
        model={"trainable_layers": 2, "device": "cpu"},
        data={"tasks": [], "text_files": [str(text)]},
        loss={"lam": 0.0},
        distill={"teacher_cache": False, "save_every": 0, "batch_size": 1},
    )
    run = setup(cfg, tmp_path / "run")
    ids = torch.tensor([[5, 6, 7, 8]])
    run.model(input_ids=ids).logits.float().sum().backward()
    run.opt.step()
    weights = sum(p.numel() * p.element_size() for p in run.params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in run.params)
    states = sum(
        v.numel() * v.element_size() for s in run.opt.state.values() for v in s.values() if v.dim() > 0
    )  # exp_avg, exp_avg_sq (the step counters are scalars)
    planned = P.training_state_bytes(cfg, P.shapes(cfg, [], counts=_counts()))
    assert planned == {
        "student trained weights (float32)": weights,
        "gradients (float32)": grads,
        "AdamW states (float32)": states,
    }
    assert all(p.dtype == torch.float32 for p in run.params)


def test_ddp_bucket_bytes_against_the_reducer(tiny_teacher_dir):
    """With several processes DDP holds a flat float32 copy of the trained gradients (accelerate's defaults:
    gradient_as_bucket_view False); one gloo process shows the Reducer's buckets."""
    import torch.distributed as dist

    from dskd.models import build_pair

    cfg = _recipe(tiny_teacher_dir)
    student = build_pair(cfg.model).student
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        info = ddp._get_ddp_logging_data()
        buckets = sum(int(x) for x in str(info["bucket_sizes"]).split(", "))
        assert not info["gradient_as_bucket_view"]
    finally:
        dist.destroy_process_group()
    assert P.ddp_bucket_bytes(cfg, P.shapes(cfg, [], gpus=2, counts=_counts())) == buckets
    assert P.ddp_bucket_bytes(cfg, P.shapes(cfg, [], gpus=1, counts=_counts())) == 0


@pytest.mark.parametrize("at_targets", [True, False])
def test_logits_working_set_measured_on_a_real_step(at_targets):
    """Peak live bytes of one teacher-online KD + CE micro-batch (forward and backward) through the loop's own
    functions, per target x vocabulary entry, on a model whose vocabulary dwarfs everything else."""
    from dskd import data as D
    from dskd.config import LossConfig
    from dskd.distill import micro_batch_loss, teacher_outputs
    from dskd.models import freeze_except_top, head_at_targets_ok, keep_float32_master, truncate

    V, T = 8192, 96
    teacher = make_model(V, layers=2, hidden=16, tie=False).to(torch.bfloat16)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = truncate(teacher, 2, share=True)
    freeze_except_top(student, 1)
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.clone()
    keep_float32_master(student)
    student.train()
    assert head_at_targets_ok(student)
    batch = D.collate([torch.randint(3, V, (T,), generator=torch.Generator().manual_seed(0))], 0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    meter = LiveBytes(teacher, student, *batch.values())
    with meter:
        t_logits, t_h = teacher_outputs(teacher, None, [0], batch, V, autocast)
        loss, _, _ = micro_batch_loss(
            student,
            batch,
            t_logits,
            t_h,
            LossConfig(lam=0.0),
            V,
            float(T - 1),
            0.0,
            [],
            None,
            autocast,
            None,
            at_targets,
        )
        loss.backward()
    per_entry = meter.peak / ((T - 1) * V)
    expected = P.LOGIT_BYTES_FULL if at_targets else 41  # the other path's count (plan.py, beside the constant)
    assert expected <= per_entry < expected + 0.5, per_entry
    cfg = from_dict({"data": {"max_length": 2048}, "distill": {"batch_size": 1}})
    llama = _llama_shapes()
    assert P.logits_bytes(cfg, llama) == 2048 * 128256 * P.LOGIT_BYTES_FULL
    assert 10e9 < P.logits_bytes(cfg, llama) < 13e9  # Llama-3-8B at the paper's 2,048 tokens


def _llama_shapes() -> P.Shapes:
    t = P.architecture(*P.model_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    return P.Shapes(t, t, 16, 0, True, 2, 0, _counts(), 1, 1, [], [], [], 2)


def test_memo_cap_is_prefix_memos_and_bounds_the_shared_work(tiny_teacher_dir):
    from dskd.prefix import PrefixMemo

    assert P.memo_cap_bytes() == PrefixMemo(1).max_bytes == 4 * 2**30
    cfg = _recipe(tiny_teacher_dir)
    sh = P.shapes(cfg, [], counts=_counts(eval_tokens=1000))
    need = 1000 * sh.t.hidden * 2
    assert P.memo_bytes(cfg, sh) == (need, 1.0)  # everything fits: every batch served
    big = P.shapes(cfg, [], counts=_counts(eval_tokens=10 * P.memo_cap_bytes() // (sh.t.hidden * 2)))
    held, share = P.memo_bytes(cfg, big)
    assert held == P.memo_cap_bytes() and share == pytest.approx(0.1)
    # past the cap the students recompute the shared layers: more compute than with every batch served
    e_small = P.eval_stage(cfg, sh)[0]
    e_big = P.eval_stage(cfg, big)[0]
    assert e_big.host["shared-prefix memo"] == P.memo_cap_bytes() and "of the batches" in e_big.notes[0]
    per_token = e_big.flops / big.counts.eval_tokens
    assert per_token > e_small.flops / sh.counts.eval_tokens


def test_sense_candidates_are_the_targets_not_the_store(tiny_teacher_dir):
    cfg = _recipe(tiny_teacher_dir, senses={"k": 4, "max_tokens": 10**6}, loss={"max_synonyms": 2, "max_antonyms": 1})
    few = P.shapes(cfg, [], counts=_counts(target_tokens_max=10))
    assert P.sense_bank_bytes(cfg, few) == 10 * (1 + 2 + 1) * 4 * few.t.hidden * 2
    unknown = P.shapes(cfg, [], counts=_counts(target_tokens_max=None))  # no tokenizer: the store bounds it
    assert P.sense_bank_bytes(cfg, unknown) == min(unknown.t.vocab, 10**6) * 4 * unknown.t.hidden * 2
