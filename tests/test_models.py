import pytest
import torch
from conftest import make_model, make_tokenizer

from dskd.config import ModelConfig
from dskd.models import (
    ModelError,
    build_pair,
    check_same_tokenizer,
    decoder_layers,
    fingerprint,
    freeze_except_top,
    load_model,
    load_tokenizer,
    resolve_spec,
    shared_vocab_size,
    tokenizer_fingerprint,
    truncate,
)


@pytest.fixture
def teacher(tokenizer):
    return make_model(len(tokenizer), layers=4, seed=0)


def _ids(tokenizer):
    return tokenizer("The opposite of hot is cold. A synonym of big is large.", return_tensors="pt")["input_ids"]


def test_student_with_all_layers_reproduces_teacher_logits(teacher, tokenizer):
    student = truncate(teacher, 4)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, student(ids).logits)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_truncated_student_equals_first_n_layers_then_norm_and_head(teacher, tokenizer, n):
    student = truncate(teacher, n)
    ids = _ids(tokenizer)
    with torch.no_grad():
        hs = teacher(ids, output_hidden_states=True).hidden_states
        # hidden_states[n] is the output of decoder layer n (before the final norm), for n < L.
        expected = teacher.lm_head(teacher.model.norm(hs[n]))
        got = student(ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert len(decoder_layers(student)[1]) == n
    # copies, not shared storage: training the student must never move the teacher
    assert (
        student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    )


def test_truncation_bounds(teacher):
    with pytest.raises(ModelError, match="student_layers"):
        truncate(teacher, 5)
    with pytest.raises(ModelError, match="student_layers"):
        truncate(teacher, 0)


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_exactly_top_m_layers_require_grad(teacher, m):
    student = truncate(teacher, 3)
    names = freeze_except_top(student, m)
    trainable_layers = {int(n.split(".")[2]) for n in names}
    assert trainable_layers == set(range(3 - m, 3))
    for name, p in student.named_parameters():
        in_top = name.startswith("model.layers.") and int(name.split(".")[2]) >= 3 - m
        assert p.requires_grad == in_top, name
    assert not student.model.embed_tokens.weight.requires_grad
    assert not student.model.norm.weight.requires_grad


def test_fingerprints_stable_and_distinct(tokenizer):
    a1 = make_model(len(tokenizer), layers=4, seed=0)
    a2 = make_model(len(tokenizer), layers=4, seed=1)  # same config, other weights: same identity by design
    b = make_model(len(tokenizer), layers=3)
    c = make_model(len(tokenizer), layers=4, hidden=64)
    other_tok = make_tokenizer(vocab_size=400)
    fa = fingerprint(a1, tokenizer)
    assert fa == fingerprint(a1, tokenizer) == fingerprint(a2, tokenizer)
    assert len({fa, fingerprint(b, tokenizer), fingerprint(c, tokenizer), fingerprint(a1, other_tok)}) == 4
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other_tok)


def test_wrong_tokenizer_pair_refused(tokenizer):
    other = make_tokenizer(vocab_size=400)
    with pytest.raises(ModelError, match="tokenizer mismatch"):
        check_same_tokenizer(tokenizer, other)
    check_same_tokenizer(tokenizer, make_tokenizer())  # same training -> same vocabulary


def test_padded_vocabulary_is_sliced_not_refused(tokenizer):
    t = make_model(len(tokenizer) + 64, layers=2)  # padded like some Qwen checkpoints
    s = make_model(len(tokenizer), layers=1)
    assert shared_vocab_size(t, s, tokenizer) == len(tokenizer)
    short = make_model(len(tokenizer) - 10, layers=1)
    with pytest.raises(ModelError, match="output rows"):
        shared_vocab_size(t, short, tokenizer)


def test_build_pair_from_folder_and_independent_student(tiny_teacher_dir, tmp_path, tokenizer):
    pair = build_pair(ModelConfig(teacher=str(tiny_teacher_dir), trainable_layers=1))
    assert pair.info["student_layers"] == 2 and pair.info["trainable_layers"] == 1
    assert all(not p.requires_grad for p in pair.teacher.parameters())
    # an independent student with the same tokenizer is accepted
    sdir = tmp_path / "student"
    make_model(len(tokenizer), layers=2, seed=3).save_pretrained(sdir)
    tokenizer.save_pretrained(sdir)
    pair2 = build_pair(ModelConfig(teacher=str(tiny_teacher_dir), student=str(sdir), trainable_layers=1))
    assert pair2.info["student"]["kind"] == "independent"
    # ... and one with another tokenizer is refused with a clear message
    bad = tmp_path / "bad"
    other = make_tokenizer(vocab_size=400)
    make_model(len(other), layers=2).save_pretrained(bad)
    other.save_pretrained(bad)
    with pytest.raises(ModelError, match="tokenizer mismatch"):
        build_pair(ModelConfig(teacher=str(tiny_teacher_dir), student=str(bad)))


def test_spec_errors(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_spec(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="config.json"):
        resolve_spec(str(tmp_path))
    with pytest.raises(ModelError, match="could not load"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_packaged_smollm2_completes_opposite_of_hot(packaged_model_dir):
    from dskd.models import complete

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert "cold" in complete(model, tok, "The opposite of hot is", max_new_tokens=5).lower()


# ---- shared frozen prefix (dskd.prefix) ------------------------------------------------------------
def _frozen_student(teacher, n_layers: int, trainable: int):
    from dskd.models import freeze_except_top, truncate

    student = truncate(teacher, n_layers)
    freeze_except_top(student, trainable)
    return student


def test_split_decoder_equals_whole_and_restores_its_layers():
    from conftest import make_model

    from dskd.prefix import layer_range, prefix_states, split_ok, suffix_hidden

    m = make_model(500, layers=4).eval()
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        whole = m.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for n in (1, 3, 4):
            states = prefix_states(m, n, input_ids=ids, attention_mask=mask)
            assert torch.equal(suffix_hidden(m, n, states, attention_mask=mask), whole)
        with pytest.raises(RuntimeError), layer_range(m, 2):
            raise RuntimeError("the layers come back after an error")
    assert len(m.model.layers) == 4 and isinstance(m.model.norm, torch.nn.Module)
    assert split_ok(m, 2) and not split_ok(m, 0) and not split_ok(m, 5)


def test_shared_prefix_layers_counts_the_frozen_equal_bottom_layers():
    from conftest import make_model

    from dskd.prefix import prefix_fingerprint, shared_prefix_layers

    teacher = make_model(500, layers=4).eval()
    student = _frozen_student(teacher, 3, 1)
    assert shared_prefix_layers(teacher, student) == 2  # layer 2 is trainable
    assert prefix_fingerprint(teacher, 2) == prefix_fingerprint(student, 2)
    assert prefix_fingerprint(teacher, 2) != prefix_fingerprint(teacher, 3)
    perturbed = _frozen_student(teacher, 3, 1)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    assert shared_prefix_layers(teacher, perturbed) == 1
    assert prefix_fingerprint(perturbed, 2) != prefix_fingerprint(teacher, 2)
    assert prefix_fingerprint(perturbed, 1) == prefix_fingerprint(teacher, 1)
    trained_embeddings = _frozen_student(teacher, 3, 1)
    trained_embeddings.get_input_embeddings().weight.requires_grad_(True)
    assert shared_prefix_layers(teacher, trained_embeddings) == 0
    assert shared_prefix_layers(teacher, make_model(500, layers=3, seed=1)) == 0  # another model


def test_a_decoder_that_adds_positions_to_inputs_embeds_is_not_split():
    """GPT-2 adds learned positions to inputs_embeds: splitting it would add them twice, so it runs whole."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dskd.prefix import shared_prefix_layers, split_ok

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    assert not split_ok(teacher, 1)
    assert shared_prefix_layers(teacher, _frozen_student(teacher, 2, 1)) == 0


def test_probes_run_a_model_with_float32_master_weights_beside_bfloat16_ones():
    """After keep_float32_master the trained layers are float32 and the frozen ones bfloat16: the probes
    run such a model as training does (autocast), instead of failing on the head's dtype."""
    from conftest import make_model

    from dskd.models import freeze_except_top, head_at_targets_ok, keep_float32_master, truncate
    from dskd.prefix import shared_prefix_layers

    teacher = make_model(500, layers=3).to(torch.bfloat16).eval()
    student = truncate(teacher, 2)
    freeze_except_top(student, 1)
    keep_float32_master(student)
    assert {p.dtype for p in student.parameters()} == {torch.float32, torch.bfloat16}
    assert head_at_targets_ok(student) and shared_prefix_layers(teacher, student) == 1
