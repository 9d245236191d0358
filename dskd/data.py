"""Distillation data: prompts + teacher continuations, batches, and the teacher cache.

Training sequences (method.md section 4) are chat-formatted k-shot multiple-choice prompts built from
the tasks' *training* items (``dskd.tasks``; gold labels unused) followed by the teacher's greedy
continuation (``data.continuation_tokens``, 1 by default); plain text files (``data.text_files``,
``.txt`` or ``.jsonl``, read by :mod:`dskd.corpus` with the sense corpus's rules) are added as they
are, cut into ``data.max_length`` windows. Targets are the next token at *every* position.

A built training set is a folder::

    dataset.safetensors   input_ids (flat, int32) and offsets (n + 1,) of the sequences
    recipe.json           the data config, tokenizer and teacher fingerprints, and its hash

The teacher cache is one batched teacher pass over the training set (sequences sorted by length,
right-padded like training batches). It stores, for every *target* position of every sequence (all
but the last), the teacher's last hidden state (after the final norm; fp16 by default). What KD
reads depends on the student (``distill.cache_kd``):

* the student shares the teacher's frozen LM head (every truncated student): no logits at all. The
  teacher's full-vocabulary logits are that head applied to the cached state, recomputed at training
  time, so cached KD is the method's KD over the whole vocabulary (exact up to the hidden dtype);
* otherwise (a student with its own head) the logits: with ``distill.cache_topk = 0`` all of them,
  else the top-k log-probabilities at the KD temperature T and the log of the remaining mass, kept
  as one tail bucket (sparse KD, see :class:`dskd.losses.SparseTeacher`); the mean tail mass is
  recorded in ``meta.json`` and printed by the run.

When the student's bottom layers are the teacher's, frozen, bit for bit (a truncated student trained
in its top layers; ``distill.cache_prefix``), the cache also keeps the teacher's state entering the
first layer the student trains (in the dtype it was computed in): training then runs only the layers
above it, from that state, which is what the whole student would compute there.

1-token teacher continuations (the default) come from that same pass: the argmax at a prompt's last
position is appended to it. Longer continuations are generated first, greedily, in left-padded
batches with a KV cache::

    meta.json                 format (version 2), key (hash of format, teacher fingerprint, data
                              recipe, cache settings), settings, counts, tail mass, tokens/s,
                              complete: true (written last)
    dataset.safetensors       the training set + cache_shard / cache_start per sequence
    shard-00000.safetensors   hidden (P, d); with logits: logits (P, V) or topk_ids (P, k) +
                              topk_logp (P, k) + rest_logp (P,); with a shared prefix: prefix
                              (P, d); P = target positions

A cache is refused when its key differs from what a run needs (another teacher, head, data recipe,
k, T, dtype, or a cache written by an older version): :class:`CacheError` says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dskd.config import DataConfig, DskdError, ModelConfig, RunConfig, TrainConfig
from dskd.io import Artefact, atomic_dir, check_files, open_artefact, write_json
from dskd.io import stable_hash as _sha
from dskd.losses import IGNORE_INDEX, SparseTeacher, sparse_teacher
from dskd.prefix import layer_range, prefix_states, shared_prefix_layers

CACHE_FORMAT = {"name": "dskd-teacher-cache", "version": 2}
DATA_FORMAT = {"name": "dskd-dataset", "version": 1}
_SHARD_BYTES = 256 * 2**20


class DataError(DskdError, ValueError):
    """Training data that cannot be built (no items, unreadable files); names the flag or file."""


class CacheError(DskdError, ValueError):
    """A teacher cache that does not belong to this run (stale, foreign, or incomplete)."""


CACHE_ARTEFACT = Artefact(
    CACHE_FORMAT["name"], CACHE_FORMAT["version"], "teacher cache", "dskd cache build", CacheError
)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _dskd_version() -> str:
    from dskd import __version__

    return __version__


# ----------------------------------------------------------------------------- the training set


@dataclass
class TokenData:
    """Tokenised training sequences (prompt + continuation, or a text window).

    Attributes:
        seqs: One int64 tensor of token ids per sequence. [(L_i,)]
        recipe: What made them (data config, fingerprints); ``recipe["hash"]`` identifies them.
    """

    seqs: list[torch.Tensor]
    recipe: dict[str, Any]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def hash(self) -> str:
        return self.recipe["hash"]

    def num_targets(self, idx: Iterable[int]) -> int:
        """Target positions of these sequences (every position but the last)."""
        return sum(max(len(self.seqs[i]) - 1, 0) for i in idx)

    def tensors(self) -> dict[str, torch.Tensor]:
        lens = torch.tensor([len(s) for s in self.seqs], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        flat = torch.cat(self.seqs).to(torch.int32) if self.seqs else torch.zeros(0, dtype=torch.int32)
        return {"input_ids": flat, "offsets": offsets}

    def save(self, folder: Path) -> None:
        """Write ``dataset.safetensors`` and ``recipe.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(folder / "dataset.safetensors"))
        write_recipe(folder, self.recipe)

    @classmethod
    def load(cls, folder: Path) -> TokenData:
        from safetensors.torch import load_file

        t = load_file(str(folder / "dataset.safetensors"))
        recipe = json.loads((folder / "recipe.json").read_text())
        recipe.pop("format", None)
        return cls(_split(t["input_ids"], t["offsets"]), recipe)


def _split(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    return [flat[offsets[i] : offsets[i + 1]].long() for i in range(len(offsets) - 1)]


def write_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    """Write a training set's ``recipe.json`` (format tag + :func:`data_recipe`) into ``folder``, atomically."""
    write_json(folder / "recipe.json", {"format": DATA_FORMAT, **recipe}, sort_keys=True)


def data_recipe(data: DataConfig, tokenizer_fp: str, teacher_fp: str) -> dict[str, Any]:
    """The identity of a training set: data config, fingerprints and text-file contents, plus its hash."""
    files = []
    for f in data.text_files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise DataError(f"--data.text_files: no such file: {f}")
        files.append({"path": str(p), "sha": _file_sha(p)})
    fields = asdict(data)
    if not data.datasets:
        fields.pop("datasets")  # the recipes (and cache keys) of the runs made before the field are unchanged
    body = {
        "data": fields,
        "tokenizer_fingerprint": tokenizer_fp,
        # the continuation is the teacher's, so the data depend on it
        "teacher_fingerprint": teacher_fp,
        "text_file_hashes": [f["sha"] for f in files],
    }
    if data.datasets:
        body["dataset_hashes"] = [dataset_identity(spec) for spec in data.datasets]
    return {**body, "text_files": files, "hash": _sha(body)}


# ----------------------------------------------------------------------------- the user's datasets

DATASETS_FLAG = "--data.datasets"


def dataset_identity(spec: str) -> str:
    """What identifies a ``data.datasets`` entry's content: a file's SHA-256, a ``save_to_disk`` folder's
    datasets fingerprint(s) (else the SHA of its files), a hub dataset's fingerprint."""
    p = Path(spec).expanduser()
    if p.is_file():
        return _file_sha(p)
    if p.is_dir():
        states = sorted(p.rglob("state.json"))
        if states:
            return _sha([json.loads(f.read_text()).get("_fingerprint") for f in states])
        return _sha([[str(f.relative_to(p)), _file_sha(f)] for f in sorted(p.rglob("*")) if f.is_file()])
    if spec.startswith((".", "/", "~")):
        raise DataError(f"{DATASETS_FLAG}: no such file or folder: {spec}")
    return _sha(["hub", spec, _hub_dataset(spec)._fingerprint])


def _hub_dataset(spec: str):
    import datasets

    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # datasets raises many types; the user needs the flag and the source
        raise DataError(f"{DATASETS_FLAG}: cannot load {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def dataset_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """(where, row) of a ``data.datasets`` entry: ``FILE:LINE`` of a ``.jsonl`` file, ``SOURCE row N`` else."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".jsonl":
            raise DataError(
                f"{DATASETS_FLAG}: {p}: a file must be .jsonl (rows with messages, prompt/completion or text)"
            )
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{DATASETS_FLAG}: {p}:{i}: not valid JSON ({e})") from e
                yield f"{p}:{i}", row
        return
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{DATASETS_FLAG}: {p}: not a datasets save_to_disk folder ({type(e).__name__})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{DATASETS_FLAG}: {p}: has no train split (has {', '.join(ds)})")
            ds = ds["train"]
    elif spec.startswith((".", "/", "~")):
        raise DataError(f"{DATASETS_FLAG}: no such file or folder: {spec}")
    else:
        ds = _hub_dataset(spec)
    for i, row in enumerate(ds):
        yield f"{spec} row {i}", row


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def row_text(row: Any, where: str, tokenizer, chat: bool) -> tuple[str, bool]:
    """A row's training text and whether it carries its special tokens already (a chat template's).

    ``messages``: the model's own chat template over the whole conversation; ``prompt`` + ``completion``:
    a user and an assistant turn through it when ``chat``, else the two joined; ``text``: as is.

    Raises:
        DataError: one line naming the file and line (or the dataset and row).
    """
    if not isinstance(row, dict):
        raise DataError(f"{DATASETS_FLAG}: {where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not (
            isinstance(msgs, list)
            and msgs
            and all(isinstance(m, dict) and _is_str(m.get("role")) and _is_str(m.get("content")) for m in msgs)
        ):
            raise DataError(f"{DATASETS_FLAG}: {where}: messages must be a non-empty list of {{role, content}} strings")
        return _chat(tokenizer, msgs, where), True
    if "prompt" in row or "completion" in row:
        p, c = row.get("prompt"), row.get("completion")
        if not (_is_str(p) and _is_str(c)):
            raise DataError(f"{DATASETS_FLAG}: {where}: prompt and completion must both be strings")
        if chat:
            return _chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": c}], where), True
        return p + c, False
    if "text" in row:
        if not _is_str(row["text"]) or not row["text"]:
            raise DataError(f"{DATASETS_FLAG}: {where}: text must be a non-empty string")
        return row["text"], False
    raise DataError(
        f"{DATASETS_FLAG}: {where}: a row needs messages, prompt and completion, or text (it has {', '.join(row) or 'nothing'})"
    )


def _chat(tokenizer, messages: list[dict[str, str]], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{DATASETS_FLAG}: {where}: chat rows need the model's chat template; this tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def dataset_windows(dc: DataConfig, tokenizer) -> list[torch.Tensor]:
    """Token windows (at most ``data.max_length`` tokens) of the rows of ``data.datasets``."""
    out = []
    for spec in dc.datasets:
        for where, row in dataset_rows(spec):
            text, templated = row_text(row, where, tokenizer, dc.chat)
            ids = torch.tensor(tokenizer(text, add_special_tokens=not templated)["input_ids"], dtype=torch.long)
            out += [w for s in range(0, len(ids), dc.max_length) if len(w := ids[s : s + dc.max_length]) >= 2]
    return out


def task_prompts(dc: DataConfig, tokenizer) -> list[str]:
    """k-shot prompts from the training items of ``data.tasks`` (seeded sample, seeded exemplars).

    ``data.style`` picks lettered-choice prompts or cloze prompts (the question as log-likelihood
    scoring asks it; the exemplars solved with their answer text).

    Exemplars are other training items of the same task, of the same subject when items have one
    (MMLU-style), never the item itself.
    """
    if not dc.tasks:
        return []
    from dskd.prompts import training_prompt
    from dskd.tasks import get_task

    rng = random.Random(dc.seed)
    prompts = []
    for name in dc.tasks:
        task = get_task(name, flag="--data.tasks")
        items = list(task.train_items())
        if not items:
            raise DataError(f"--data.tasks: task {name!r} has no training items")
        n = max(1, round(len(items) * dc.sample_frac))
        chosen = rng.sample(range(len(items)), n)
        if dc.max_items:
            chosen = chosen[: dc.max_items]
        by_subject: dict[Any, list[int]] = {}
        for j, it in enumerate(items):
            by_subject.setdefault(getattr(it, "subject", None), []).append(j)
        for i in chosen:
            item = items[i]
            pool = [j for j in by_subject[getattr(item, "subject", None)] if j != i]
            if len(pool) < dc.shots:
                pool = [j for j in range(len(items)) if j != i]
            ex = [items[j] for j in rng.sample(pool, min(dc.shots, len(pool)))]
            prompts.append(training_prompt(task, item, ex, tokenizer, dc.chat, dc.style))
    return prompts


def text_windows(dc: DataConfig, tokenizer) -> list[torch.Tensor]:
    """Token windows (at most ``data.max_length`` tokens) of the documents of ``data.text_files``,
    read by the one corpus reader (:mod:`dskd.corpus`: each ``.txt`` paragraph, each ``.jsonl``
    line's ``text``, ``passage`` or ``content`` field)."""
    from dskd.corpus import CorpusError, file_documents

    out = []
    for f in dc.text_files:
        try:
            texts = list(
                file_documents(Path(f).expanduser(), flag="--data.text_files", max_chars=0)
            )  # a paragraph each
        except CorpusError as e:
            raise DataError(str(e)) from e
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
            for s in range(0, len(ids), dc.max_length):
                w = ids[s : s + dc.max_length]
                if len(w) >= 2:
                    out.append(w)
    return out


@torch.no_grad()
def greedy_continuations(
    teacher: torch.nn.Module,
    prompts: list[torch.Tensor],
    n: int,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[torch.Tensor]:
    """The teacher's greedy continuations of many prompts, generated in left-padded batches.

    Prompts are sorted by length so a batch carries little padding; position ids follow the
    attention mask, and a KV cache makes each generated token one 1-token step.

    Args:
        teacher: A causal LM.
        prompts: Prompt token ids. [(L_i,)]
        n: Tokens to generate per prompt (greedy, no early stop at EOS).
        pad_id: Any token id (padding is masked).
        batch_size: Prompts per batch.
        progress: Show a progress bar.

    Returns:
        The generated ids per prompt, in the prompts' order. [(n,)]
    """
    from tqdm import tqdm

    out = [torch.zeros(0, dtype=torch.long) for _ in prompts]
    if n == 0 or not prompts:
        return out
    dev = next(teacher.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for b in tqdm(range(0, len(order), batch_size), desc="teacher continuations", disable=not progress):
        idx = order[b : b + batch_size]
        L = max(len(prompts[i]) for i in idx)
        x = torch.full((len(idx), L), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, L - len(prompts[i]) :] = prompts[i]
            att[j, L - len(prompts[i]) :] = 1
        x, att = x.to(dev), att.to(dev)  # (B, L)
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # (B, L): a left-padded row starts at position 0
        o = teacher(input_ids=x, attention_mask=att, position_ids=pos, use_cache=True)
        nxt = o.logits[:, -1].argmax(-1)  # (B,)
        toks = [nxt]
        # transformers >= 5.2x calls the KV cache ``cache``; earlier 5.x releases ``past_key_values``
        cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
        for _ in range(n - 1):
            past = getattr(o, "cache", None)
            past = o.past_key_values if past is None else past
            att = torch.cat([att, att.new_ones(len(idx), 1)], dim=1)
            pos = pos[:, -1:] + 1  # (B, 1)
            o = teacher(
                input_ids=nxt[:, None],
                attention_mask=att,
                position_ids=pos,
                use_cache=True,
                **{cache_arg: past},
            )
            nxt = o.logits[:, -1].argmax(-1)
            toks.append(nxt)
        gen = torch.stack(toks, dim=1).cpu()  # (B, n)
        for j, i in enumerate(idx):
            out[i] = gen[j]
    return out


def prompt_and_text_sequences(dc: DataConfig, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tokenised prompts (truncated from the left to leave room for the continuation) and text windows."""
    keep = dc.max_length - dc.continuation_tokens
    prompts = []
    for prompt in task_prompts(dc, tokenizer):
        # chat prompts carry their special tokens as text already
        ids = torch.tensor(tokenizer(prompt, add_special_tokens=not dc.chat)["input_ids"], dtype=torch.long)
        prompts.append(ids[-keep:])  # truncate from the left: the question and answer slot are at the end
    windows = text_windows(dc, tokenizer) + (dataset_windows(dc, tokenizer) if dc.datasets else [])
    if not prompts and not windows:
        raise DataError("--data.tasks / --data.text_files / --data.datasets: no training sequences")
    return prompts, windows


def build_token_data(
    dc: DataConfig, tokenizer, teacher: torch.nn.Module, recipe: dict[str, Any], batch_size: int = 8
) -> TokenData:
    """Tokenise the prompts, append the teacher's greedy continuation (batched), add the text windows."""
    prompts, windows = prompt_and_text_sequences(dc, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    conts = greedy_continuations(teacher, prompts, dc.continuation_tokens, pad_id, batch_size, progress=True)
    return TokenData([torch.cat([p, c]) for p, c in zip(prompts, conts, strict=True)] + windows, recipe)


def prepare_data(dc: DataConfig, folder: Path, tokenizer, teacher, recipe: dict[str, Any]) -> TokenData:
    """The training set in ``folder``: loaded when its recipe matches, else built and saved."""
    if (folder / "recipe.json").is_file() and (folder / "dataset.safetensors").is_file():
        data = TokenData.load(folder)
        if data.hash == recipe["hash"]:
            return data
    data = build_token_data(dc, tokenizer, teacher, recipe)
    data.save(folder)
    return data


# ----------------------------------------------------------------------------- batches


def collate(seqs: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences; targets are the next token at every position.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with IGNORE_INDEX at the
        last position of each sequence and on padding.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        att[i, : len(s)] = 1
        labels[i, : len(s) - 1] = s[1:]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of one epoch: a seeded permutation cut into ``batch_size`` chunks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def teacher_forward(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits (B, T, V) and last hidden states after the final norm (B, T, d)."""
    o = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return o.logits, o.hidden_states[-1]


# ----------------------------------------------------------------------------- the teacher cache


def cache_head(distill: TrainConfig, pair) -> str | None:
    """The probe of the shared LM head when KD can be recomputed through it (see ``distill.cache_kd``), else None.

    Raises:
        CacheError: ``distill.cache_kd`` is ``head`` and the student does not share the teacher's head.
    """
    from dskd.models import head_probe, shared_head_problem

    if distill.cache_kd == "logits":
        return None
    problem = shared_head_problem(pair.teacher, pair.student, pair.vocab_size)
    if problem is None:
        return head_probe(pair.student)
    if distill.cache_kd == "head":
        raise CacheError(f"--distill.cache_kd head: {problem}; use auto or logits for this student")
    return None


def cache_prefix(distill: TrainConfig, pair) -> int:
    """The bottom layers whose output state the cache stores (``distill.cache_prefix``): as many as the
    student shares, frozen and bit for bit, with the teacher (:func:`dskd.prefix.shared_prefix_layers`;
    0 when off or none)."""
    return shared_prefix_layers(pair.teacher, pair.student) if distill.cache_prefix == "auto" else 0


def run_cache_settings(distill: TrainConfig, T: float, pair) -> dict[str, Any]:
    """:func:`cache_settings` of a loaded teacher/student pair (shared head and shared prefix checked)."""
    return cache_settings(distill, T, pair.vocab_size, cache_head(distill, pair), cache_prefix(distill, pair))


def cache_settings(
    distill: TrainConfig, T: float, vocab_size: int, head: str | None = None, prefix: int = 0
) -> dict[str, Any]:
    """What a cache must match besides the data: what it keeps for KD, the hidden dtype, for sparse KD T,
    and the shared prefix's depth.

    Args:
        distill: The run's training section (``cache_kd``, ``cache_topk``, ``cache_hidden_dtype``).
        T: The KD temperature (``loss.T``): sparse log-probs are stored at it.
        vocab_size: Logit columns KD compares.
        head: :func:`cache_head` of the run: the shared head's probe (no logits stored) or None.
        prefix: :func:`cache_prefix`: also store the state entering this layer (0: not).
    """
    s: dict[str, Any] = {"vocab_size": vocab_size, "hidden_dtype": distill.cache_hidden_dtype}
    if prefix:
        s["prefix_layers"] = prefix
    if head is not None:
        return {**s, "kd": "head", "head": head}
    k = distill.cache_topk
    if k == 0 or k >= vocab_size:
        return {**s, "kd": "logits", "topk": vocab_size}
    # sparse log-probs are stored at the KD temperature
    return {**s, "kd": "topk", "topk": k, "T": T}


def cache_key(teacher_fp: str, recipe_hash: str, settings: dict[str, Any]) -> str:
    return _sha({"format": CACHE_FORMAT["version"], "teacher": teacher_fp, "data": recipe_hash, "settings": settings})


def default_cache_dir(out: Path, key: str) -> Path:
    """Runs in one folder (KD, DSKD, seeds) share ``<runs>/teacher_cache/<key>``."""
    return Path(out).parent / "teacher_cache" / key


class TeacherCache:
    """A memory-mapped teacher cache; ``get`` returns a padded micro-batch of teacher outputs."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        from safetensors.torch import load_file

        from dskd.tensorfile import TensorFile

        self.path, self.meta = Path(path), meta
        t = load_file(str(self.path / "dataset.safetensors"))
        recipe = json.loads((self.path / "recipe.json").read_text())
        recipe.pop("format", None)
        self.data = TokenData(_split(t["input_ids"], t["offsets"]), recipe)
        self.shard, self.start = t["cache_shard"].tolist(), t["cache_start"].tolist()
        self.kd = meta["settings"]["kd"]  # head | logits | topk
        self.prefix_layers = int(meta["settings"].get("prefix_layers", 0))  # the state entering it is kept
        self._files = [TensorFile(self.path / name) for name in meta["shards"]]  # kept open: lazy slices

    @classmethod
    def open(cls, path: Path | str, key: str | None = None, flag: str = "--distill.cache_dir") -> TeacherCache:
        """Open a complete cache; refuse one whose key differs from ``key``."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise CacheError(f"{flag}: {path} is not a teacher cache (no meta.json)")
        meta = json.loads(meta_path.read_text())
        fmt = meta.get("format", {})
        if fmt.get("name") != CACHE_FORMAT["name"] or not meta.get("complete"):
            raise CacheError(f"{flag}: {path} is not a complete teacher cache; rebuild it with `dskd cache build`")
        if fmt.get("version") != CACHE_FORMAT["version"]:
            raise CacheError(
                f"{flag}: {path} is a teacher cache of format version {fmt.get('version')} (this version reads "
                f"{CACHE_FORMAT['version']}); rebuild it with `dskd cache build --force` or point {flag} elsewhere"
            )
        if key is not None and meta.get("key") != key:
            raise CacheError(
                f"{flag}: {path} was built for another teacher or data recipe (cache key {meta.get('key')}, "
                f"this run needs {key}; teacher {meta.get('teacher_fingerprint')}, data {meta.get('recipe_hash')}, "
                f"settings {meta.get('settings')}). Point --distill.cache_dir elsewhere or rebuild it."
            )
        # the common open-check (dskd.io): whole files, and one line naming a damaged one
        check_files(path, CACHE_ARTEFACT, ["dataset.safetensors", "recipe.json", *meta.get("shards", [])])
        return open_artefact(path, CACHE_ARTEFACT, lambda m: cls(path, m), files=False)

    def get(self, idx: list[int], T: int) -> tuple[torch.Tensor | SparseTeacher | None, torch.Tensor]:
        """Teacher outputs of sequences ``idx``, right-padded to length ``T``.

        Every position but a sequence's last has a row; the last one and the padding are zeros
        (they have no target, so no loss reads them).

        Returns:
            (None when the logits are to be recomputed through the shared head (``kd == "head"``),
            else logits (B, T, V) float32 or a SparseTeacher with (B, T, k) fields; hidden (B, T, d)
            float32)
        """
        names = {"head": (), "logits": ("logits",), "topk": ("topk_ids", "topk_logp", "rest_logp")}[self.kd]
        rows = self._rows(idx, T, ("hidden", *names))
        hidden = rows["hidden"].float()
        if self.kd == "head":
            return None, hidden
        if self.kd == "logits":
            return rows["logits"].float(), hidden
        return (
            SparseTeacher(
                ids=rows["topk_ids"].long(),
                logp=rows["topk_logp"],
                # padding positions get a finite value; they are masked by the labels anyway
                rest_logp=rows["rest_logp"],
            ),
            hidden,
        )

    def prefix(self, idx: list[int], T: int) -> torch.Tensor:
        """The teacher's states entering layer ``prefix_layers`` (B, T, d) of sequences ``idx``, right-padded
        to ``T`` like :meth:`get` (a sequence's last position and the padding are zeros: causal attention
        keeps them out of every position that has a target)."""
        if not self.prefix_layers:
            raise CacheError(f"{self.path}: this teacher cache keeps no prefix states")
        return self._rows(idx, T, ("prefix",))["prefix"]

    def _rows(self, idx: list[int], T: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Stored rows ``names`` of sequences ``idx``, each (B, T, ...) zero-padded after a sequence's rows."""
        rows: dict[str, list[torch.Tensor]] = {}
        for i in idx:
            f, s, n = self._files[self.shard[i]], self.start[i], max(len(self.data.seqs[i]) - 1, 0)
            for name in names:
                x = f.rows(name, s, s + n)
                pad = [0, 0] * (x.dim() - 1) + [0, T - n]
                rows.setdefault(name, []).append(torch.nn.functional.pad(x, pad))
        return {k: torch.stack(v) for k, v in rows.items()}


def _length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) cut into batches of at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _refuse_foreign_folder(out: Path) -> None:
    """Refuse a non-empty ``out`` that is not a teacher cache (never delete a folder that is not ours).

    Raises:
        CacheError: ``out`` holds files and no teacher cache's ``meta.json``.
    """
    if out.exists() and any(out.iterdir()):
        try:
            is_cache = json.loads((out / "meta.json").read_text())["format"]["name"] == CACHE_FORMAT["name"]
        except (OSError, ValueError, KeyError, TypeError):
            is_cache = False
        if not is_cache:
            raise CacheError(f"--distill.cache_dir: {out} exists and is not a teacher cache; pick an empty folder")


class _ShardWriter:
    """Cache rows gathered sequence by sequence and written as shards of about ``_SHARD_BYTES``.

    Attributes:
        folder: Where the shards go.
        names: File names of the shards written so far.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = []
        self._buf: dict[str, list[torch.Tensor]] = {}
        self._used = 0  # bytes in the buffer
        self._pos = 0  # rows in the buffer

    def add(self, rec: dict[str, torch.Tensor], n: int) -> tuple[int, int]:
        """Buffer one sequence's rows (``n`` of each tensor in ``rec``), writing a shard once it is full.

        Returns:
            (shard index, first row in that shard) of the sequence.
        """
        for name, v in rec.items():
            self._buf.setdefault(name, []).append(v)
        where = (len(self.names), self._pos)
        self._pos += n
        self._used += sum(v.numel() * v.element_size() for v in rec.values())
        if self._used >= _SHARD_BYTES:
            self.flush()
        return where

    def flush(self) -> None:
        """Write the buffered rows (if any) as the next shard; the next sequence starts a new one."""
        from safetensors.torch import save_file

        if self._buf:
            name = f"shard-{len(self.names):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in self._buf.items()}, str(self.folder / name))
            self.names.append(name)
            self._buf.clear()
        self._used = self._pos = 0


@torch.no_grad()
def _teacher_states(
    teacher: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, n_pre: int, kd: str, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One cache forward of the teacher over a right-padded batch.

    With a shared prefix (``n_pre`` > 0) it computes the state entering layer ``n_pre``, then runs the
    layers above from it (the same operations as one whole forward).

    Args:
        teacher: The teacher.
        ids: (B, T) input ids; att: (B, T) attention mask, on the teacher's device.
        n_pre: Layers of the shared prefix (0: none).
        kd: ``head`` (no logits computed over all positions), ``logits`` or ``topk``.
        vocab_size: Logit columns kept.
    Returns:
        (hidden (B, T, d) last hidden states on the device, logits (B, T, V) float32 on the CPU or None
        for ``head``, prefix states (B, T, d) on the device or None).
    """
    states = prefix_states(teacher, n_pre, input_ids=ids, attention_mask=att) if n_pre else None
    x = {"input_ids": ids} if states is None else {"inputs_embeds": states}
    with layer_range(teacher, n_pre) if n_pre else contextlib.nullcontext():
        if kd == "head":
            # no logits over all positions: the head runs only where a continuation is taken
            hidden = teacher.base_model(**x, attention_mask=att).last_hidden_state  # (B, T, d)
            return hidden, None, states
        o = teacher(**x, attention_mask=att, output_hidden_states=True)
        return o.hidden_states[-1], o.logits[..., :vocab_size].float().cpu(), states  # (B, T, V)


@torch.no_grad()
def _append_continuations(
    data: TokenData,
    idx: list[int],
    inputs: list[torch.Tensor],
    pending: list[bool],
    hidden: torch.Tensor,
    logits: torch.Tensor | None,
    head: torch.nn.Module,
    vocab_size: int,
) -> None:
    """Append to each pending prompt of the batch the teacher's argmax at its last position, in place.

    Args:
        data: The training set (``data.seqs`` is updated).
        idx: The batch's sequences; inputs: every sequence's cache input; pending: which are prompts to continue.
        hidden: (B, T, d) the batch's last hidden states; logits: (B, T, V) or None (then ``head`` makes them).
        head: The teacher's LM head.
        vocab_size: Logit columns compared.
    """
    for j, i in enumerate(idx):
        if pending[i]:
            last = len(inputs[i]) - 1
            z = head(hidden[j, last])[:vocab_size] if logits is None else logits[j, last]  # (V,)
            data.seqs[i] = torch.cat([data.seqs[i], z.argmax(-1).view(1).cpu().long()])


def _cache_rows(
    hidden: torch.Tensor,
    states: torch.Tensor | None,
    logits: torch.Tensor | None,
    settings: dict[str, Any],
    h_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """What the cache keeps of one sequence's target positions (the rows of its shard).

    Args:
        hidden: (n, d) last hidden states; states: (n, d) prefix states or None; logits: (n, V) or None.
        settings: :func:`cache_settings`.
        h_dtype: Dtype of the stored hidden states.
    Returns:
        (the rows by tensor name, the tail masses (n,) outside the top-k, or None when not ``topk``).
    """
    rec = {"hidden": hidden.to(h_dtype)}
    if states is not None:  # in the dtype it was computed in: the student's exact input
        rec["prefix"] = states
    if settings["kd"] == "logits":
        rec["logits"] = logits
    elif settings["kd"] == "topk":
        sp = sparse_teacher(logits, settings["topk"], settings["T"])
        rec.update(topk_ids=sp.ids.to(torch.int32), topk_logp=sp.logp, rest_logp=sp.rest_logp)
        return rec, sp.rest_logp.exp()
    return rec, None


def write_cache(
    out: Path,
    data: TokenData,
    teacher: torch.nn.Module,
    teacher_fp: str,
    settings: dict[str, Any],
    vocab_size: int,
    batch_tokens: int = 4096,
    progress: bool = True,
    continue_prompts: list[bool] | None = None,
) -> Path:
    """Run the teacher once over ``data`` and write a cache folder at ``out`` (built aside, renamed over).

    Args:
        out: The cache folder.
        data: The training set. Sequences flagged in ``continue_prompts`` are prompts still without
            their 1-token continuation: it is the argmax at the prompt's last position of this same
            forward, and is appended to ``data.seqs[i]`` in place.
        teacher: The teacher.
        teacher_fp: Its fingerprint.
        settings: :func:`cache_settings` (``kd: head`` stores no logits).
        vocab_size: Logit columns KD compares.
        batch_tokens: Padded tokens per forward (sequences sorted by length, so little padding).
        progress: Show a progress bar (in tokens, with tokens/s).
        continue_prompts: Per sequence, whether it is a prompt to continue (default: none).
    """
    from safetensors.torch import save_file

    out = Path(out)
    _refuse_foreign_folder(out)
    pending = continue_prompts or [False] * len(data)
    # the states of a sequence's target positions need only its tokens but the last (causal attention)
    inputs = [s if pending[i] else s[:-1] for i, s in enumerate(data.seqs)]
    with atomic_dir(out) as tmp:
        h_dtype = {"float16": torch.float16, "float32": torch.float32}[settings["hidden_dtype"]]
        shards = _ShardWriter(tmp)
        shard_of, start_of, tails, seconds = _cache_pass(
            data, inputs, pending, teacher, settings, vocab_size, h_dtype, shards, batch_tokens, progress
        )
        total = sum(len(x) for x in inputs)
        tensors = data.tensors()
        tensors["cache_shard"] = torch.tensor(shard_of, dtype=torch.long)
        tensors["cache_start"] = torch.tensor(start_of, dtype=torch.long)
        save_file(tensors, str(tmp / "dataset.safetensors"))
        write_recipe(tmp, data.recipe)
        meta = {
            "format": CACHE_FORMAT,
            "dskd_version": _dskd_version(),
            "key": cache_key(teacher_fp, data.hash, settings),
            "teacher_fingerprint": teacher_fp,
            "recipe_hash": data.hash,
            "settings": settings,
            "shards": shards.names,
            "counts": {"sequences": len(data), "positions": total},
            "tail_mass": _tail_summary(tails, settings),
            "seconds": round(seconds, 2),
            "tokens_per_s": round(total / max(seconds, 1e-9), 1),
            "complete": True,
        }
        write_json(tmp / "meta.json", meta, sort_keys=True)
    print(
        f"teacher cache: {total:,} positions of {len(data):,} sequences in {seconds:.1f} s "
        f"({meta['tokens_per_s']:.0f} tokens/s); {describe_cache_kd(meta)}"
    )
    return out


def _cache_pass(
    data: TokenData,
    inputs: list[torch.Tensor],
    pending: list[bool],
    teacher: torch.nn.Module,
    settings: dict[str, Any],
    vocab_size: int,
    h_dtype: torch.dtype,
    shards: _ShardWriter,
    batch_tokens: int,
    progress: bool,
) -> tuple[list[int], list[int], list[torch.Tensor], float]:
    """The teacher's pass of :func:`write_cache`: batches sorted by length, rows into ``shards``.

    Args:
        data: The training set (pending prompts get their continuation appended).
        inputs: Per sequence, the tokens the teacher reads (all but the last; a pending prompt whole).
        pending: Per sequence, whether it is a prompt to continue.
        teacher: The teacher.
        settings: :func:`cache_settings`.
        vocab_size: Logit columns KD compares.
        h_dtype: Dtype of the stored hidden states.
        shards: Where the rows go (flushed at the end).
        batch_tokens: Padded tokens per forward.
        progress: Show a progress bar.
    Returns:
        (shard of each sequence, its first row there, the top-k tail masses, seconds of the pass).
    """
    from tqdm import tqdm

    kd, n_pre = settings["kd"], settings.get("prefix_layers", 0)
    dev = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    shard_of, start_of = [0] * len(data), [0] * len(data)
    tails: list[torch.Tensor] = []
    teacher.eval()
    bar = tqdm(
        total=sum(len(x) for x in inputs), desc="teacher cache", disable=not progress, unit="tok", unit_scale=True
    )
    t0 = time.time()
    for idx in _length_batches([len(x) for x in inputs], batch_tokens):
        idx = [i for i in idx if len(inputs[i])]
        if not idx:
            continue
        batch = collate([inputs[i] for i in idx], 0)
        ids, att = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        hidden, logits, states = _teacher_states(teacher, ids, att, n_pre, kd, vocab_size)
        _append_continuations(data, idx, inputs, pending, hidden, logits, head, vocab_size)
        hidden = hidden.cpu()
        states = states.cpu() if states is not None else None
        for j, i in enumerate(idx):
            n = len(inputs[i])
            rec, tail = _cache_rows(
                hidden[j, :n],
                None if states is None else states[j, :n],
                None if logits is None else logits[j, :n],
                settings,
                h_dtype,
            )
            if tail is not None:
                tails.append(tail)
            shard_of[i], start_of[i] = shards.add(rec, n)
        bar.update(sum(len(inputs[i]) for i in idx))
    shards.flush()
    bar.close()
    return shard_of, start_of, tails, time.time() - t0


def _tail_summary(tails: list[torch.Tensor], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher's probability mass outside the cached top-k at T (kept as one bucket), over all positions."""
    if settings["kd"] != "topk" or not tails:
        return None
    t = torch.cat(tails).float()
    q = torch.quantile(t[: 2**24], torch.tensor([0.1, 0.5, 0.9])).tolist()  # quantile has a size limit
    return {"mean": round(float(t.mean()), 4), "p10": round(q[0], 4), "median": round(q[1], 4), "p90": round(q[2], 4)}


def describe_cache_kd(meta: dict[str, Any]) -> str:
    """One line saying what KD reads from a cache (printed by the cache stage and by each run)."""
    st = meta["settings"]
    if st["kd"] == "head":
        return (
            f"exact KD: full-vocabulary ({st['vocab_size']:,}) teacher logits recomputed from the cached "
            "hidden states through the shared frozen LM head"
        )
    if st["kd"] == "logits":
        return f"exact KD from the cached full logits ({st['vocab_size']:,} per position)"
    tail = meta.get("tail_mass") or {}
    return (
        f"sparse KD: the teacher's top-{st['topk']} of {st['vocab_size']:,} tokens at T = {st['T']} plus one tail "
        f"bucket (kept, not renormalised) holding on average {tail.get('mean', float('nan')):.3f} of the "
        f"teacher's mass (median {tail.get('median', float('nan')):.3f}), compared as a single token"
    )


def build_teacher_cache(
    model: ModelConfig,
    data: DataConfig,
    distill: TrainConfig,
    T: float,
    out: Path | str | None = None,
    *,
    force: bool = False,
    run_dir: Path | str | None = None,
) -> Path:
    """Build the teacher cache of a training set (skipped when ``out`` already holds a matching one).

    Args:
        model: Teacher and student (``model``; ``model.device`` picks the device).
        data: The training set (``data``).
        distill: What the cache keeps and where (``distill.cache_kd`` / ``cache_topk`` /
            ``cache_hidden_dtype`` / ``cache_dir``).
        T: The KD temperature (``loss.T``): sparse top-k log-probabilities are stored at it.
        out: Cache folder (default: ``distill.cache_dir``, else ``<run_dir>/../teacher_cache/<key>``).
        force: Rebuild even when a matching cache exists (one with another key is always rebuilt).
        run_dir: The run folder the default location is derived from.

    Returns:
        The cache folder.
    """
    from dskd.devices import log_placement, resolve_device
    from dskd.models import build_pair, check_rope_length

    device = resolve_device(model.device, flag="--model.device")
    pair = build_pair(model, device=device)
    check_rope_length(pair.teacher, data.max_length, "--data.max_length", "cached training sequences")
    log_placement("cache build", device, next(pair.teacher.parameters()).dtype)
    return ensure_cache(data, distill, T, pair, out, force=force, rebuild_foreign=True, run_dir=run_dir)


def ensure_cache(
    dc: DataConfig,
    distill: TrainConfig,
    T: float,
    pair,
    out: Path | str | None = None,
    force: bool = False,
    rebuild_foreign: bool = False,
    run_dir: Path | str | None = None,
    data_dir: Path | None = None,
) -> Path:
    """The cache of this training set at ``out``, built (with its training set) when missing or incomplete.

    Args:
        dc: The training set (``data``).
        distill: What the cache keeps and where (``distill.cache_*``).
        T: The KD temperature (``loss.T``).
        pair: The loaded teacher/student pair (:func:`dskd.models.build_pair`).
        out: Cache folder (default ``distill.cache_dir``, else ``<run_dir>/../teacher_cache/<key>``).
        force: Rebuild whatever the folder holds.
        rebuild_foreign: Rebuild a complete cache of another key (the builder's contract) instead of
            refusing it (what a training run does: it never overwrites a cache it was pointed at).
        run_dir: The run folder the default location is derived from.
        data_dir: Also keep the training set in this folder (reused when its recipe matches).
    """
    from dskd.models import tokenizer_fingerprint

    recipe = data_recipe(dc, tokenizer_fingerprint(pair.tokenizer), pair.teacher_fingerprint)
    settings = run_cache_settings(distill, T, pair)
    key = cache_key(pair.teacher_fingerprint, recipe["hash"], settings)
    if out is None:
        if not distill.cache_dir and run_dir is None:
            raise CacheError("--distill.cache_dir: no cache folder given and no run folder to put one beside")
        out = distill.cache_dir or default_cache_dir(Path(run_dir), key)
    out = Path(out)
    meta = out / "meta.json"
    # a complete cache of any version or key counts here: a training run refuses (never overwrites) one
    # that is not its own, with the error of TeacherCache.open
    if not force and meta.is_file() and json.loads(meta.read_text()).get("complete"):
        if not rebuild_foreign:
            TeacherCache.open(out, key)  # a complete cache of another teacher/recipe is refused
            return out
        if json.loads(meta.read_text()).get("key") == key:
            return out
    data, pending = None, None
    if data_dir is not None and (Path(data_dir) / "recipe.json").is_file():
        saved = TokenData.load(Path(data_dir))
        data = saved if saved.hash == recipe["hash"] else None
    if data is None:
        if dc.continuation_tokens == 1:
            # the continuation comes from the cache's own forward: one teacher pass in all
            prompts, windows = prompt_and_text_sequences(dc, pair.tokenizer)
            data = TokenData(prompts + windows, recipe)
            pending = [True] * len(prompts) + [False] * len(windows)
        else:
            data = build_token_data(dc, pair.tokenizer, pair.teacher, recipe)
    path = write_cache(
        out, data, pair.teacher, pair.teacher_fingerprint, settings, pair.vocab_size, continue_prompts=pending
    )
    if data_dir is not None and pending is not None:
        data.save(Path(data_dir))
    return path


def cache_build_command(cfg: RunConfig, force: bool = False) -> Path:
    """Run the teacher once over the training set of a recipe (its 1-token answers come from the same
    pass) and store its last hidden states, for any number of runs (KD, DSKD, seeds) of the same teacher
    and data. A student sharing the teacher's frozen LM head (a truncated one) gets exact KD from them;
    for a student with its own head the top-k logits are stored too (distill.cache_kd, cache_topk).

    Example: dskd cache build --config configs/smollm2-135m_to_15l.yaml

    Args:
        cfg: The recipe (model, data, distill.cache_*, loss.T).
        force: Rebuild even when the folder holds a matching cache.
    """
    from dskd.devices import check_required_accelerator

    check_required_accelerator(cfg.model.require_accelerator)
    path = build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, force=force, run_dir=cfg.out_dir)
    meta = json.loads((path / "meta.json").read_text())
    print(
        f"teacher cache: {path} (key {meta['key']}, {meta['counts']['sequences']} sequences, "
        f"{meta['counts']['positions']} positions)"
    )
    return path
