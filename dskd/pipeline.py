"""The main job and the paired experiment: every stage of the method, each skipped when done.

``dskd run`` chains: assets -> lexicon -> sense dictionary -> teacher cache -> KD and DSKD students
-> evaluation of teacher, untrained truncated student, KD and DSKD -> held-out fidelity of the
students to the teacher (:mod:`dskd.fidelity`) -> report tables and pictures. A ``prompts`` entry in
``senses.corpus`` makes the training prompts a corpus of the sense dictionary (``<out>/prompts.jsonl``).

Each stage writes an artefact into the run folder and records in the artefact's own sidecar
(:mod:`dskd.io`: ``inputs_hash``) a hash of everything it was built from (its config section and the
hashes of the stages it reads). A rerun skips every stage whose artefact is complete and was built
from the same inputs (:func:`dskd.io.is_built`), so a rerun is quick, an interrupted run continues
(the distillation stage also resumes mid-training from its last checkpoint), and changing one option
rebuilds exactly the stages downstream of it. ``<out>/pipeline.json`` only records, for the reader,
where each stage wrote and how long it took.

Under ``accelerate launch --num_processes N -m dskd run`` (or torchrun) every process runs the chain in
one process group (:func:`join_launch`: accelerate's backend, ``distill.timeout_minutes``). Process 0
decides whether each stage runs, moves old outputs aside, writes and logs; the others wait at a barrier
while it builds the lexicon, the training prompts, the teacher cache and the untrained student. The sense
gather is shared (each process gathers its blocks of the corpus; process 0 clusters) and every student
is trained by all processes (DDP). Then the other processes leave the group and exit, and process 0
alone evaluates, measures fidelity and writes the report: no process waits at a barrier during them.
``dskd experiment`` is refused under several processes (its evaluations come between trainings).

``dskd experiment`` runs several arms (KD, DSKD, KD + direct hidden-state MSE, ablations) over
several seeds, sharing the lexicon, the sense store and the teacher cache, and reports per task the
mean of each arm and the paired difference against KD with its bootstrap confidence interval.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dskd.config import ConfigError, DataConfig, EvalConfig, LossConfig, RunConfig, TrainConfig, config_diff, to_dict
from dskd.io import (
    META_FILE,
    Artefact,
    atomic_dir,
    is_built,
    read_sidecar,
    record_inputs,
    sidecar_file,
    stable_hash,
    write_json,
    write_text_atomic,
)

if TYPE_CHECKING:
    from dskd.prefix import PrefixMemo

_SENSE_RUNTIME = ("device", "dtype", "sample_dtype", "block_chars")  # SenseConfig fields added later
STAGES = ("assets", "lexicon", "senses", "cache", "students", "eval", "fidelity", "report")

# Arms of the experiment: name -> (description, loss overrides).
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "kd": ("logit KD + CE (lambda = 0)", {"lam": 0.0, "hidden": "none", "hidden_weight": 0.0}),
    "dskd": ("KD + CE + sense loss", {}),
    "hidden_mse": (
        "KD + CE + direct MSE to the teacher's last hidden state (no dictionary)",
        {"lam": 0.0, "hidden": "mse", "hidden_weight": None},  # None: use the config's lambda
    ),
    "dskd_no_ant": ("DSKD without antonyms", {"use_antonyms": False}),
    "dskd_no_syn": ("DSKD without synonyms", {"use_synonyms": False}),
    "dskd_no_self": ("DSKD without the self-sense term", {"self_sense": False}),
    "dskd_ref": ("DSKD with the reference code's antonym candidates", {"reference_antonyms": True}),
}
DEFAULT_ARMS = ("kd", "dskd", "hidden_mse")
LOSS_KEYS = ("loss", "ce", "kd", "sense", "hidden", "hinge_active_share")


def quick_config(cfg: RunConfig) -> RunConfig:
    """The ``--quick`` variant: same stages, budgets small enough for a few minutes on 2 cores."""
    q = copy.deepcopy(cfg)
    q.name = f"{cfg.name}-quick"
    if q.out:
        q.out = f"{q.out}-quick"
    q.senses.max_tokens = min(q.senses.max_tokens, 12_000)
    q.senses.max_samples = min(q.senses.max_samples, 200)
    q.data.tasks = [t for t in q.data.tasks if t.startswith("arc")] or q.data.tasks[:1]
    q.data.shots = min(q.data.shots, 1)
    q.data.max_items = 24 if q.data.max_items == 0 else min(q.data.max_items, 24)
    q.data.max_length = min(q.data.max_length, 384)
    q.distill.epochs = 1
    q.distill.max_steps = 6 if q.distill.max_steps == 0 else min(q.distill.max_steps, 6)
    q.distill.grad_accum = min(q.distill.grad_accum, 4)
    q.distill.save_every = 0
    q.eval.tasks = [t for t in q.eval.tasks if t.startswith("arc")] or q.eval.tasks[:1]
    q.eval.limit = 40 if q.eval.limit == 0 else min(q.eval.limit, 40)
    q.eval.bootstrap = min(q.eval.bootstrap, 200)
    q.eval.paper_limit = -1 if q.eval.paper_limit < 0 else min(q.eval.paper_limit or 4, 4)
    q.fidelity.text_limit = 20 if q.fidelity.text_limit == 0 else min(q.fidelity.text_limit, 20)
    q.fidelity.prompt_limit = 4 if q.fidelity.prompt_limit == 0 else min(q.fidelity.prompt_limit, 4)
    q.fidelity.bootstrap = min(q.fidelity.bootstrap, 200)
    return q


# The sidecar the pipeline writes for an output that has none of its own (the training prompts file,
# the untrained student's folder), so that every stage is skipped by the same rule.
STAGE_OUTPUT = Artefact("dskd-stage-output", 1, "stage output", "dskd run")


def without_added_defaults(inputs: dict[str, Any]) -> dict[str, Any]:
    """Stage inputs without the config fields added after run folders were saved (``dskd.config.ADDED_FIELDS``)
    where they hold the value that behaves as before: the hashes of the stages built before them still match."""
    from dskd.config import ADDED_FIELDS

    out = dict(inputs)
    for dotted, value in ADDED_FIELDS.items():
        sec, name = dotted.split(".", 1)
        if isinstance(out.get(sec), dict) and name in out[sec] and out[sec][name] == value:
            out[sec] = {k: v for k, v in out[sec].items() if k != name}
    return out


@dataclasses.dataclass
class Launch:
    """This process's place in a launch of ``dskd run`` by ``accelerate launch`` / ``torchrun`` (alone:
    rank 0 of 1, and every method does nothing). See :func:`join_launch`."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is process 0, the one that writes every shared file."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process is here (under the process group's timeout, ``distill.timeout_minutes``)."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def leave(self) -> Launch:
        """End this process's part in the group (all processes call it together); process 0 goes on alone."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()
        return Launch()


def join_launch(cfg: RunConfig) -> Launch:
    """Join the launch's process group when started as several processes (``WORLD_SIZE`` > 1).

    The group is accelerate's, created here before the first stage, as training would create it: the
    backend it trains with (NCCL on GPUs, gloo on the CPU) and the recipe's ``distill.timeout_minutes``,
    the longest any process may wait at a barrier. The sense build and every student's training then run
    in it. A DeepSpeed, FSDP or Megatron launch config is refused here, before any work (dskd trains
    with DDP).
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    for backend in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):  # what `accelerate launch` exports from such a config
        if parse_flag_from_env(f"ACCELERATE_USE_{backend}"):
            raise ConfigError(
                f"accelerate launch: the accelerate config asks for {backend} (ACCELERATE_USE_{backend}); dskd run "
                "trains with DDP only: launch with a multi-GPU (DDP) accelerate config"
            )
    cpu = cfg.model.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")  # as the Accelerator reads it
    state = PartialState(cpu=cpu, timeout=timedelta(minutes=cfg.distill.timeout_minutes))
    if state.num_processes != world:
        raise ConfigError(
            f"launched as {world} processes but accelerate sees {state.num_processes} (each would write the same "
            "run folder): on CPU set ACCELERATE_USE_CPU=1 with torchrun, on GPUs use `accelerate launch`"
        )
    return Launch(state.process_index, state.num_processes)


class Pipeline:
    """Runs stages into one folder; each is skipped when its artefact says it was built from the same inputs."""

    def __init__(
        self, out: Path, force: bool = False, log: Callable[[str], None] = print, launch: Launch | None = None
    ):
        self.out = out
        self.launch = launch or Launch()  # under several processes: process 0 decides, writes and logs
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_file = out / "pipeline.json"  # paths and times, for the reader
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.force = force
        self.log = log if self.launch.main else _quiet
        self.timings: dict[str, float] = {}
        self.hashes: dict[str, str] = {}  # inputs hash of each stage met in this run (what downstream reads)
        self.stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())  # names this run's folder under replaced/

    def stage(
        self,
        key: str,
        inputs: dict[str, Any],
        path: Path,
        fn: Callable[[], Any],
        kind: Artefact | None = None,
        every_process: bool = False,
    ) -> str:
        """Run ``fn`` unless the artefact at ``path`` is built from the same ``inputs``; returns their hash.

        Args:
            key: The stage's name in the log and in ``pipeline.json``.
            inputs: Everything the artefact depends on (JSON-able); its :func:`stable_hash` goes into
                the artefact's sidecar once ``fn`` has built it.
            path: The artefact ``fn`` writes.
            fn: Builds it.
            kind: Its kind (:class:`dskd.io.Artefact`); None for an output without a sidecar of its own,
                which gets a bare one (:data:`STAGE_OUTPUT`, beside a file or inside a folder).
            every_process: Under several processes (:class:`Launch`), every process runs ``fn`` (it shares
                the work itself: the sense gather, DDP training); otherwise process 0 runs it while the
                others wait. Either way process 0 alone decides whether it runs, moves an old output
                aside and records the inputs.
        """
        h = stable_hash(without_added_defaults(inputs))
        self.hashes[key] = h
        own = kind is None
        kind = kind or STAGE_OUTPUT
        todo = False
        if self.launch.main:
            todo = self.force or not (is_built(path, kind, h) or self._adopt(key, path, kind, h, own))
            if not todo:
                self.log(f"[skip] {key:<24} {path}  (up to date)")
            else:
                if finished(path, own):  # never deleted: a finished output of other inputs is moved aside
                    self.set_aside(key, path, "built from other inputs" if not self.force else "--force")
                self.log(f"[run ] {key:<24} -> {path}")
                if own:  # a sidecar of the previous output must not vouch for a half-written new one
                    sidecar_file(path).unlink(missing_ok=True)
        if not self.launch.broadcast(todo):
            return h
        if self.launch.main or every_process:
            t0 = time.time()
            fn()
            dt = time.time() - t0
        if self.launch.main:
            record_inputs(path, kind, h, create=own)
            self.timings[key] = dt
            self.state[key] = {"path": str(path), "seconds": round(dt, 1)}
            write_json(self.state_file, self.state)
            self.log(f"[done] {key:<24} {dt:7.1f}s")
        self.launch.barrier()  # the others wait while process 0 builds and records it
        return h

    def set_aside(self, key: str, path: Path, why: str) -> Path:
        """Move ``path`` (with a sidecar beside it) to ``<out>/replaced/<UTC time of this run>/<its path in
        out>``: what a stage is about to rebuild is kept, never deleted. Returns the new place."""
        path = Path(path)
        try:
            rel = path.resolve().relative_to(self.out.resolve())
        except ValueError:
            rel = Path(path.name)
        dst = self.out / REPLACED_DIR / self.stamp / rel
        n = 1
        while dst.exists() or dst.with_name(f"{dst.name}.{META_FILE}").exists():
            dst, n = self.out / REPLACED_DIR / f"{self.stamp}.{n}" / rel, n + 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        beside = sidecar_file(path)
        path.rename(dst)
        if beside.parent == path.parent and beside != path and beside.exists():  # prompts.jsonl.meta.json
            beside.rename(dst.with_name(beside.name))
        self.log(f"[keep] {key:<24} {path} ({why}) moved to {dst}")
        return dst

    def _adopt(self, key: str, path: Path, kind: Artefact, h: str, own: bool) -> bool:
        """A run folder written before the sidecars held the inputs hash kept it in ``pipeline.json``
        (``hash``, ``complete``): a whole artefact built from the same inputs is stamped and kept."""
        old = self.state.get(key, {})
        if old.get("hash") != h or not old.get("complete"):
            return False
        if own:  # no sidecar to check: the output must be there (a folder not empty)
            if sidecar_file(path).exists() or not path.exists() or (path.is_dir() and not any(path.iterdir())):
                return False
        else:
            try:
                if "inputs_hash" in read_sidecar(path, kind):
                    return False  # built since from other inputs
            except Exception:  # noqa: BLE001 - an incomplete or damaged artefact is rebuilt
                return False
        record_inputs(path, kind, h, create=own)
        self.state[key] = {"path": str(path), "seconds": old.get("seconds")}  # the hash lives in the sidecar now
        write_json(self.state_file, self.state)
        return True


def _quiet(_: str) -> None:
    """The log of a process other than process 0."""


REPLACED_DIR = "replaced"  # <out>/replaced/<UTC time>/...: finished outputs a later run rebuilt


def finished(path: Path, own: bool = False) -> bool:
    """``path`` holds a finished output: its sidecar (:func:`dskd.io.sidecar_file`) says ``complete``,
    whatever its format or inputs; a model folder without a sidecar (``own``) counts when it has weights."""
    meta_file = sidecar_file(path)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return own and path.is_dir() and any(path.glob("*/*.safetensors"))
    return isinstance(meta, dict) and bool(meta.get("complete"))


ARM_SECTIONS = ("loss", "distill")


def parse_arm(arm: str) -> tuple[str, dict[str, dict[str, Any]], str]:
    """An arm name, optionally with overrides: ``dskd@margin=0.5@distill.epochs=6``.

    A bare key is a loss field; ``distill.KEY`` a training field. Values are YAML scalars.

    Returns:
        (base arm, {section: {field: value}}, description).
    """
    import yaml

    base, *parts = arm.split("@")
    if base not in ARMS:
        raise ConfigError(f"--arms: unknown arm {base!r}; valid: {', '.join(ARMS)} (optionally @key=value)")
    overrides: dict[str, dict[str, Any]] = {}
    for part in parts:
        key, eq, raw = part.partition("=")
        section, _, field = key.rpartition(".")
        section = section or "loss"
        if not eq or section not in ARM_SECTIONS:
            raise ConfigError(f"--arms: {arm!r}: expected @key=value with key a loss field or distill.FIELD")
        valid = {f.name for f in dataclasses.fields(LossConfig if section == "loss" else TrainConfig)}
        if field not in valid:
            raise ConfigError(f"--arms: {arm!r}: {section} has no field {field!r}; valid: {', '.join(sorted(valid))}")
        overrides.setdefault(section, {})[field] = yaml.safe_load(raw)
    desc = ARMS[base][0] + "".join(f", {p}" for p in parts)
    return base, overrides, desc


def _arm_config(cfg: RunConfig, arm: str, seed: int | None = None) -> RunConfig:
    base, extra, _ = parse_arm(arm)
    c = copy.deepcopy(cfg)
    overrides = dict(ARMS[base][1])
    if overrides.get("hidden_weight", 0.0) is None:
        overrides["hidden_weight"] = cfg.loss.lam if cfg.loss.lam > 0 else 1.0
    overrides.update(extra.get("loss", {}))
    try:
        c.loss = dataclasses.replace(c.loss, **overrides)
        c.distill = dataclasses.replace(c.distill, **extra.get("distill", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--arms: {arm!r}: {e}") from e
    if seed is not None:
        c.distill = dataclasses.replace(c.distill, seed=seed)
        c.data = dataclasses.replace(c.data, seed=c.data.seed)  # same data for every seed: paired arms
    return c


def prepare_shared(cfg: RunConfig, pipe: Pipeline) -> dict[str, Any]:
    """assets -> lexicon -> senses -> teacher cache; returns their paths and hashes."""
    from dskd import assets

    out = pipe.out
    # the offline defaults check themselves (a step that finds its output does nothing, in well under
    # a second), so this stage needs no sidecar: it is skipped when no step had anything to do
    t0 = time.time()
    if pipe.launch.main:  # under several processes the others wait: they read what it writes
        reports = assets.prepare_all(only=assets.needed_assets(cfg))  # what this recipe reads, before long work
        for r in reports:
            if r.error:
                raise ConfigError(r.error)
        if any(r.did_work for r in reports):
            pipe.log(f"[done] {'assets':<24} {time.time() - t0:7.1f}s  -> {assets.dskd_home()}")
        else:
            pipe.log(f"[skip] {'assets':<24} {assets.dskd_home()}  (up to date)")
    pipe.launch.barrier()

    from dskd.lexicon import ARTEFACT as LEXICON
    from dskd.lexicon import build_lexicon
    from dskd.models import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(cfg.model.teacher, cfg.model.trust_remote_code)
    lex_dir = out / "lexicon"
    lex_inputs = {"teacher": cfg.model.teacher, "tok": tokenizer_fingerprint(tok), "cfg": to_dict(cfg.lexicon)}
    h_lex = pipe.stage(
        "lexicon", lex_inputs, lex_dir, lambda: build_lexicon(tok, cfg.model.teacher, cfg.lexicon, lex_dir), LEXICON
    )

    from dskd.senses import STORE_ARTEFACT, build_senses

    sen_dir = out / "senses"
    # runtime options at their defaults are left out, so run folders made before they existed still skip
    sen_opts = {k: v for k, v in to_dict(cfg.senses).items() if v not in ("auto", None) or k not in _SENSE_RUNTIME}
    sen_inputs = {"teacher": cfg.model.teacher, "cfg": sen_opts, "lexicon": h_lex}
    sen_cfg = cfg.senses
    # the training prompts, written once: a corpus of the sense builder (read like any .jsonl file) when
    # senses.corpus names them, and what the coverage summary measures against
    prompts = out / "prompts.jsonl"
    prompt_inputs = {"data": to_dict(cfg.data), "tok": tokenizer_fingerprint(tok)}
    h_prompts = pipe.stage("prompts", prompt_inputs, prompts, lambda: write_prompts(cfg.data, tok, prompts))
    if PROMPTS_CORPUS in cfg.senses.corpus:
        sen_inputs["prompts"] = h_prompts
        corpus = [str(prompts) if c == PROMPTS_CORPUS else c for c in cfg.senses.corpus]
        sen_cfg = dataclasses.replace(cfg.senses, corpus=corpus)

    def do_senses() -> None:
        # under several processes each gathers its share of the corpus; process 0 clusters and writes
        build_senses(cfg.model.teacher, sen_cfg, lex_dir, sen_dir)
        if pipe.launch.main:
            write_json(out / "senses_coverage.json", sense_coverage(sen_dir, lex_dir, tok, prompts))

    h_sen = pipe.stage("senses", sen_inputs, sen_dir, do_senses, STORE_ARTEFACT, every_process=True)
    if pipe.launch.main and (out / "senses_coverage.json").is_file():
        print(coverage_line(json.loads((out / "senses_coverage.json").read_text())))

    from dskd.data import CACHE_ARTEFACT, CACHE_FORMAT, build_teacher_cache

    cache_dir = out / "teacher_cache"

    cache_inputs = {
        "teacher": cfg.model.teacher,
        "data": to_dict(cfg.data),
        "topk": cfg.distill.cache_topk,
        "dtype": cfg.model.dtype,
        # a new cache format, or another KD mode / hidden dtype / T, rebuilds the cache
        "format": CACHE_FORMAT["version"],
        "kd": cfg.distill.cache_kd,
        "hidden_dtype": cfg.distill.cache_hidden_dtype,
        "T": cfg.loss.T,
    }
    h_cache = h_lex
    if cfg.distill.teacher_cache:
        h_cache = pipe.stage(
            "cache",
            cache_inputs,
            cache_dir,
            lambda: build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, cache_dir),
            CACHE_ARTEFACT,
        )
    return {
        "lexicon": lex_dir,
        "senses": sen_dir,
        "cache": cache_dir if cfg.distill.teacher_cache else None,
        "hashes": {"lexicon": h_lex, "senses": h_sen, "cache": h_cache},
    }


PROMPTS_CORPUS = "prompts"


def write_prompts(data: DataConfig, tokenizer, path: Path) -> Path:
    """The recipe's training prompts, formatted exactly as the distillation stage builds them (chat
    template included), one ``{"text": ...}`` line each: a corpus for the sense dictionary."""
    from dskd.data import task_prompts

    lines = [json.dumps({"text": p}) for p in task_prompts(data, tokenizer)]
    if not lines:
        raise ConfigError("--senses.corpus: 'prompts' needs training prompts, but data.tasks is empty")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def sense_coverage(sen_dir: Path, lex_dir: Path, tokenizer, prompts: Path | None = None) -> dict[str, Any]:
    """How much of the lexicon a sense store covers, and how much of what the training prompts need.

    Returns:
        ``lexicon_heads`` and ``heads_with_senses`` (heads whose token has senses in the store); with
        ``prompts`` (a ``{"text": ...}`` .jsonl file, tokenized as the students see chat prompts), also
        ``prompt_positions`` (positions with a next token), ``head_positions`` (those whose next token is
        a lexicon head: where the sense loss can act), ``head_positions_with_senses``, and the distinct
        ``prompt_heads`` / ``prompt_heads_with_senses``.
    """
    import torch

    from dskd.lexicon import Lexicon
    from dskd.senses import open_store

    store = open_store(sen_dir)
    v = store.vocab_size
    has = (store.offsets[1 : v + 1] - store.offsets[:v]) > 0  # (V,) token has senses
    heads = torch.tensor(sorted(h for h in Lexicon.load(lex_dir, tokenizer).heads() if 0 <= h < v), dtype=torch.long)
    rec: dict[str, Any] = {"lexicon_heads": len(heads), "heads_with_senses": int(has[heads].sum())}
    if prompts is not None:
        nxt = []
        for line in prompts.read_text().splitlines():
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            nxt += ids[1:]
        y = torch.tensor(nxt, dtype=torch.long).clamp(0, v - 1)
        is_head = torch.isin(y, heads)
        distinct = torch.unique(y[is_head])
        rec.update(
            prompt_positions=len(y),
            head_positions=int(is_head.sum()),
            head_positions_with_senses=int((is_head & has[y]).sum()),
            prompt_heads=len(distinct),
            prompt_heads_with_senses=int(has[distinct].sum()),
        )
    return rec


def coverage_line(c: dict[str, Any]) -> str:
    """One line for the run log from :func:`sense_coverage`'s record."""

    def share(k: int, n: int) -> str:
        return f"{k:,}/{n:,} ({100 * k / max(n, 1):.1f}%)"

    line = f"senses: lexicon heads with senses {share(c['heads_with_senses'], c['lexicon_heads'])}"
    if "head_positions" in c:
        line += (
            f"; training-prompt positions predicting a lexicon head: {c['head_positions']:,} of "
            f"{c['prompt_positions']:,}, with senses {share(c['head_positions_with_senses'], c['head_positions'])}"
            f" ({share(c['prompt_heads_with_senses'], c['prompt_heads'])} distinct heads)"
        )
    return line


SENSE_FIELDS = (
    "kappa", "margin", "margin_mode", "margin_quantile", "margin_calibration_seqs", "positive_margin",
    "max_synonyms", "max_antonyms", "min_positions",
    "position_frac", "self_sense", "use_synonyms", "use_antonyms", "reference_antonyms",
    "sense_scale", "sense_share", "positive_margin_mode",
)  # fmt: skip
# loss fields added after run folders were made: left out of a student's inputs at their defaults, so
# existing students still skip (their runs used these defaults)
_LOSS_ADDED = {"sense_scale": "none", "sense_share": 0.3, "positive_margin_mode": "absolute"}


def _train_inputs(c: RunConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """What a student depends on. Without the sense loss (lambda = 0), sense options and the sense
    store do not matter, so changing them does not retrain the KD baseline."""
    loss = {k: v for k, v in to_dict(c.loss).items() if k not in _LOSS_ADDED or v != _LOSS_ADDED[k]}
    hashes = dict(shared["hashes"])
    if c.loss.lam == 0:
        loss = {k: v for k, v in loss.items() if k not in SENSE_FIELDS}
        hashes.pop("senses", None)
        hashes.pop("lexicon", None)
    from dskd.checkpoint import RUNTIME_FIELDS

    distill = {k: v for k, v in to_dict(c.distill).items() if f"distill.{k}" not in RUNTIME_FIELDS}
    return {
        "model": to_dict(c.model),
        "data": to_dict(c.data),
        "loss": loss,
        "distill": distill,  # without the fields that change no student (tracking, the process-group timeout)
        "shared": hashes,
    }


TRAIN_SECTIONS = ("model", "data", "loss", "distill")  # what a student is trained from (_train_inputs)
# fields of those sections that change no weight of the student: where its inputs are read from, logging
# and checkpoint cadence
TRAIN_ONLY_PATHS = (
    "distill.lexicon_dir", "distill.senses_dir", "distill.cache_dir", "distill.log_every", "distill.save_every",
    "distill.keep_checkpoints",
)  # fmt: skip


def training_changes(saved: dict[str, Any], c: RunConfig) -> list[str]:
    """The fields that shape a student (:data:`TRAIN_SECTIONS`, less :data:`TRAIN_ONLY_PATHS`; sense
    options not at all without the sense loss) in which ``c`` differs from a run's saved config."""
    now, defaults = to_dict(c), to_dict(RunConfig())
    # a field added after the run was trained counts as its default (what the code did before)
    old = {k: {**defaults[k], **(saved.get(k) or {})} for k in TRAIN_SECTIONS}
    diffs = config_diff(old, {k: now[k] for k in TRAIN_SECTIONS})
    diffs = [d for d in diffs if d not in TRAIN_ONLY_PATHS]
    if c.loss.lam == 0 and (saved.get("loss") or {}).get("lam") == 0:
        diffs = [d for d in diffs if not (d.startswith("loss.") and d.split(".", 1)[1] in SENSE_FIELDS)]
    return diffs


def _show(v: Any) -> str:
    return "none" if v is None else (",".join(map(str, v)) if isinstance(v, list) else str(v))


def adopt_trained(run_dir: Path, c: RunConfig, shared: dict[str, Any], h: str, log: Callable[[str], None]) -> bool:
    """A finished student that ``dskd distill`` (under ``accelerate launch`` or not) wrote into the run's
    ``students/<arm>`` folder carries no stage inputs hash. It is adopted (stamped with ``h``) when the
    fields that shape it equal the recipe's and it read the run's lexicon; otherwise refused with one
    line naming the differing fields, before any work: it is never retrained over.

    Returns:
        True when adopted; False when ``run_dir`` holds no such student.
    """
    from dskd.distill import RUN_ARTEFACT

    try:
        meta = read_sidecar(run_dir, RUN_ARTEFACT)
    except Exception:  # noqa: BLE001 - not a finished run: the stage decides
        return False
    if "inputs_hash" in meta or not isinstance(meta.get("config"), dict):
        return False
    saved = meta["config"]
    diffs = training_changes(saved, c)
    flags = []
    for d in diffs:
        sec, _, f = d.partition(".")
        flags.append(f"--{d} {_show((saved.get(sec) or {}).get(f))}")
    if c.loss.lam > 0:
        used = ((meta.get("senses") or {}).get("lexicon") or {}).get("fingerprint")
        try:
            ours = json.loads((Path(shared["lexicon"]) / META_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError):
            ours = None
        if used and ours and used != ours:
            diffs.append(f"lexicon (trained with {used}, this run's {ours})")
    if diffs:
        now = to_dict(c)
        shown = []
        for d in diffs:
            sec, _, f = d.partition(".")
            if f and sec in now:
                shown.append(f"{d} {_show((saved.get(sec) or {}).get(f))} (recipe: {_show(now[sec].get(f))})")
            else:
                shown.append(d)
        hint = f"pass {' '.join(flags)} to use it, or " if flags and len(flags) == len(diffs) else ""
        raise ConfigError(
            f"{run_dir}: a finished student trained by `dskd distill` with other settings: {'; '.join(shown)}; "
            f"{hint}move the folder away (or pass --force: every output is moved under replaced/ and rebuilt) "
            "to train it anew"
        )
    record_inputs(run_dir, RUN_ARTEFACT, h)
    log(f"[keep] {'train:' + run_dir.name:<24} {run_dir}  (trained by `dskd distill` with these settings: adopted)")
    return True


def _resume_config(run_dir: Path, c: RunConfig) -> RunConfig | None:
    """The config to continue the unfinished run in ``run_dir`` with: ``c`` with the sections that do not
    shape a student taken from the run's own ``config.yaml`` (so another ``--eval...`` flag still
    resumes); None when the fields that shape it differ, or there is nothing to resume."""
    import yaml

    from dskd.config import from_dict

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return c
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
        if config_diff({k: saved.get(k) for k in TRAIN_SECTIONS}, {k: to_dict(c)[k] for k in TRAIN_SECTIONS}):
            return None  # distill resumes only with the very same training sections
        old = from_dict(saved)
    except Exception:  # noqa: BLE001 - unreadable or from another version: not resumable
        return None
    r = copy.deepcopy(c)
    for f in dataclasses.fields(RunConfig):
        if f.name not in TRAIN_SECTIONS and f.name != "out":
            setattr(r, f.name, getattr(old, f.name))
    return r


def arm_key(arm: str, seed: int | None = None) -> str:
    """An arm's student name: its folder under ``students/`` and its stage keys (``train:``, ``eval:``).
    ``seed`` None: the recipe's own seed, the student ``dskd run`` trains."""
    return arm if seed is None else f"{arm}/seed{seed}"


def train_arm(cfg: RunConfig, pipe: Pipeline, shared: dict[str, Any], arm: str, seed: int | None = None) -> Path:
    """Train one arm (continuing from its last checkpoint when interrupted); returns its student folder."""
    from dskd.distill import RUN_ARTEFACT, distill

    c = _arm_config(cfg, arm, seed)
    key = arm_key(arm, seed)
    run_dir = pipe.out / "students" / key

    inputs = _train_inputs(c, shared)
    if pipe.launch.main and not pipe.force and "hash" not in pipe.state.get(f"train:{key}", {}):
        adopt_trained(run_dir, c, shared, stable_hash(without_added_defaults(inputs)), pipe.log)

    def do() -> None:
        from dskd.checkpoint import latest_checkpoint

        rc = c
        if pipe.launch.main and run_dir.exists() and any(run_dir.iterdir()):
            has_ckpt = latest_checkpoint(run_dir) is not None
            rc = _resume_config(run_dir, c) if has_ckpt and not pipe.force else None
            if rc is None:  # trained steps of other settings are kept, never deleted
                why = (
                    "--force"
                    if pipe.force
                    else "unfinished, other settings"
                    if has_ckpt
                    else "unfinished, no checkpoint yet"
                )
                pipe.set_aside(f"train:{key}", run_dir, why)
                rc = c
        # every process trains (DDP), with process 0's choice: continue the run in the folder or start anew
        if pipe.launch.broadcast(rc is not c) and not pipe.launch.main:
            rc = _resume_config(run_dir, c) or c  # read after process 0 has set anything aside
        distill(
            rc,
            run_dir,
            lexicon_dir=shared["lexicon"],
            senses_dir=shared["senses"],
            cache_dir=shared["cache"],
            resume=True,
        )

    pipe.stage(f"train:{key}", inputs, run_dir, do, RUN_ARTEFACT, every_process=True)
    return run_dir / "student"


def export_untrained(cfg: RunConfig, pipe: Pipeline) -> Path:
    """The truncated student before training, saved as a plain folder so it is evaluated like the others."""
    from dskd.models import build_pair

    folder = pipe.out / "students" / "untrained"  # laid out like a trained run: student/ and meta.json

    def do() -> None:
        from dskd import __version__
        from dskd.card import render

        pair = build_pair(cfg.model)
        with atomic_dir(folder / "student") as tmp:
            pair.student.save_pretrained(tmp)
            pair.tokenizer.save_pretrained(tmp)
            meta = {"config": to_dict(cfg), "model": pair.info, "dskd_version": __version__}
            (tmp / "README.md").write_text(render(meta, folder / "metrics.jsonl"))

    pipe.stage("train:untrained", {"model": to_dict(cfg.model)}, folder, do)
    return folder / "student"


def shared_prefix_memo(cfg: RunConfig, untrained: Path) -> PrefixMemo | None:
    """One memo for the process's evaluations (:class:`dskd.prefix.PrefixMemo`): the teacher, the untrained
    truncation and every student trained from it share the embeddings and the frozen bottom
    ``student layers - trainable layers`` decoder layers, so those are computed once per batch. None for
    an independent student (``model.student``), which shares nothing. A pure speed-up: no stage's inputs
    or results depend on it (a model whose prefix differs simply misses)."""
    from dskd.prefix import PrefixMemo

    if cfg.model.student:
        return None
    try:  # the untrained truncation's own config says how many layers the student kept
        layers = int(json.loads((untrained / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    n = layers - min(cfg.model.trainable_layers, layers)
    return PrefixMemo(n) if n > 0 else None


def evaluate_model(
    cfg: RunConfig,
    pipe: Pipeline,
    name: str,
    spec: str,
    upstream: str,
    ecfg: EvalConfig | None = None,
    memo: PrefixMemo | None = None,
) -> Path:
    from dskd.evaluate import evaluate
    from dskd.report import RESULT_ARTEFACT

    ecfg = ecfg or cfg.eval
    kind = "eval_paper" if ecfg.preset else "eval"  # preset results live beside the main table's
    out = pipe.out / kind / f"{name.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in to_dict(ecfg).items() if k != "paper_limit"}  # the budget of the other table
    inputs = {"spec": spec, "eval": settings, "upstream": upstream}  # the memo is no input: it changes no result

    def do() -> None:
        before = dict(memo.stats) if memo is not None else {}
        evaluate(spec, ecfg, out, name=name, memo=memo)
        if memo is not None and memo.calls(before):  # generate scoring never calls it
            print(memo.describe(before))

    pipe.stage(f"{kind}:{name}", inputs, out, do, RESULT_ARTEFACT)
    return out


def fidelity_stage(
    cfg: RunConfig,
    pipe: Pipeline,
    shared: dict[str, Any],
    students: dict[str, Path],
    name: str = "fidelity",
    memo: PrefixMemo | None = None,
) -> Path:
    """Held-out fidelity of every student to the teacher (one teacher pass for all), with the sense probe;
    written to ``<out>/eval/<name>.json`` by the stage ``name``. ``memo`` (no input of the stage) computes
    the bottom layers the models share once per batch."""
    from dskd.fidelity import RESULT_ARTEFACT, fidelity

    out = pipe.out / "eval" / f"{name}.json"
    inputs = {
        "teacher": cfg.model.teacher,
        "fidelity": to_dict(cfg.fidelity),
        "prompt_tasks": cfg.eval.tasks,
        "shots": cfg.data.shots,
        # the held-out prompts are built like the training prompts; keyed only when they differ from
        # the letter chat prompts of earlier runs, so existing run folders still skip
        **(
            {"style": cfg.data.style, "chat": cfg.data.chat}
            if (cfg.data.style, cfg.data.chat) != ("letter", True)
            else {}
        ),
        "dtype": cfg.eval.dtype,
        "students": {n: _upstream(pipe, f"train:{n}") for n in students},
        "senses": shared["hashes"]["senses"],
    }

    def do() -> None:
        before = {}
        if memo is not None:  # the evaluations' batches never recur here (other inputs): free their states
            memo.clear()
            before = dict(memo.stats)
        fidelity(
            cfg.model.teacher,
            {n: str(p) for n, p in students.items()},
            cfg.fidelity,
            out,
            prompt_tasks=cfg.eval.tasks,
            shots=cfg.data.shots,
            style=cfg.data.style,
            chat=cfg.data.chat,
            senses_dir=shared["senses"],
            lexicon_dir=shared["lexicon"],
            dtype=cfg.eval.dtype,
            device=cfg.eval.device,
            baseline="kd" if "kd" in students else None,
            memo=memo,
        )
        if memo is not None:
            print(memo.describe(before))
            memo.clear()

    pipe.stage(name, inputs, out, do, RESULT_ARTEFACT)
    return out


def _upstream(pipe: Pipeline, key: str) -> str:
    """The inputs hash of the stage ``key`` met earlier in this run (what a downstream stage depends on)."""
    return pipe.hashes.get(key, "")


def plot_losses(runs: dict[str, Path], out: Path) -> Path | None:
    """Loss curves of several runs (one panel per logged loss term) from their ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dskd.plots import save_figure

    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for name, run_dir in runs.items():
        f = run_dir / "metrics.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "step" not in rec:
                continue
            for k, v in rec.items():
                if k in LOSS_KEYS and isinstance(v, int | float):
                    xs, ys = series.setdefault(k, {}).setdefault(name, ([], []))
                    xs.append(rec["step"])
                    ys.append(v)
    # drop terms that are zero for every run (e.g. the hidden-state loss when it is off)
    series = {k: v for k, v in series.items() if any(y != 0 for _, ys in v.values() for y in ys)}
    if not series:
        return None
    keys = sorted(series)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys, strict=False):
        for name, (xs, ys) in series[k].items():
            ax.plot(xs, ys, label=name)
        ax.set_title(k)
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    return out


def _train_students(cfg: RunConfig, pipe: Pipeline, shared: dict[str, Any]) -> dict[str, Path]:
    """The untrained truncation, then the KD and DSKD students (``dskd run``'s); returns their folders."""
    for arm in ("kd", "dskd"):  # students trained by `dskd distill`: adopted or refused before any training
        c = _arm_config(cfg, arm)
        if pipe.launch.main and not pipe.force and "hash" not in pipe.state.get(f"train:{arm}", {}):  # (_adopt)
            h = stable_hash(without_added_defaults(_train_inputs(c, shared)))  # as Pipeline.stage hashes
            adopt_trained(pipe.out / "students" / arm, c, shared, h, pipe.log)
    students = {"untrained": export_untrained(cfg, pipe)}
    for arm in ("kd", "dskd"):
        students[arm] = train_arm(cfg, pipe, shared, arm)
    return students


def run(cfg: RunConfig, *, until: str = "report", force: bool = False) -> dict[str, Any]:
    """The main job; returns the paths of everything it wrote."""
    if until not in STAGES:
        raise ConfigError(f"--until: must be one of {', '.join(STAGES)} (got {until!r})")
    from dskd.devices import check_required_accelerator

    check_required_accelerator(cfg.model.require_accelerator)  # before any work
    from dskd.presets import check_paper

    check_paper(cfg.eval, cfg.model.teacher)  # the paper protocol's chat prompts, before hours of work
    t0 = time.time()
    out = cfg.out_dir
    launch = join_launch(cfg)
    pipe = Pipeline(out, force=force, launch=launch)
    out.mkdir(parents=True, exist_ok=True)
    from dskd.config import dump_yaml

    if launch.main:
        dump_yaml(cfg, out / "config.yaml")
        print(f"dskd run: {cfg.name} -> {out}" + (f" ({launch.world} processes)" if launch.world > 1 else ""))
    shared = prepare_shared(cfg, pipe)
    result: dict[str, Any] = {"out": out, **{k: v for k, v in shared.items() if k != "hashes"}}
    if STAGES.index(until) < STAGES.index("students"):
        launch.leave()
        return result
    students = result["students"] = _train_students(cfg, pipe, shared)
    # what follows (evaluation, fidelity, report) is process 0's alone: the others leave the group now
    # rather than wait at a barrier for hours
    pipe.launch = launch.leave()
    if not launch.main:
        print(f"dskd run: process {launch.rank}: students trained; evaluation, fidelity and report run on process 0")
        return result
    if STAGES.index(until) < STAGES.index("eval"):
        return result
    from dskd.models import resolve_spec

    memo = shared_prefix_memo(cfg, students["untrained"])  # the teacher fills it, the students reuse it
    files = {"teacher": evaluate_model(cfg, pipe, "teacher", resolve_spec(cfg.model.teacher), "", memo=memo)}
    for name, path in students.items():
        files[name] = evaluate_model(cfg, pipe, name, str(path), _upstream(pipe, f"train:{name}"), memo=memo)
    result["eval"] = files
    # The paper's protocol (dskd.presets) on eval.paper_limit items per task; 0: the full preset.
    from dskd.presets import describe, paper_config

    paper = paper_config(cfg.eval)
    if paper is not None:
        specs = {"teacher": (resolve_spec(cfg.model.teacher), "")}
        specs |= {n: (str(p), _upstream(pipe, f"train:{n}")) for n, p in students.items()}
        result["eval_paper"] = {n: evaluate_model(cfg, pipe, n, s, u, paper, memo) for n, (s, u) in specs.items()}
    from dskd.card import write_card

    for name in ("kd", "dskd"):  # the trained students' model cards, now with their evaluation results
        evals = {"eval": files[name]}
        if paper is not None:
            evals["eval, paper protocol"] = result["eval_paper"][name]
        write_card(students[name].parent, students[name], evals)
    if STAGES.index(until) < STAGES.index("fidelity"):
        return result
    result["fidelity"] = fidelity_stage(cfg, pipe, shared, students, memo=memo)
    if STAGES.index(until) < STAGES.index("report"):
        return result
    from dskd.report import answer_gap_section, fidelity_section, report, training_diagnostics_section

    table = report(list(files.values()), baseline="kd")
    gap = answer_gap_section(list(files.values()), baseline="kd")
    table += f"\n{gap}" if gap else ""
    if paper is not None:
        table += f"\n## Paper protocol\n\n{describe(paper)}\n\n" + report(
            list(result["eval_paper"].values()), baseline="kd"
        )
    table += "\n" + fidelity_section(result["fidelity"], "kd")
    diag = training_diagnostics_section({a: out / "students" / a for a in ("kd", "dskd")})
    table += f"\n{diag}" if diag else ""
    if (out / "report.md").is_file() and (out / "report.md").read_text() != table + "\n":
        pipe.set_aside("report", out / "report.md", "other results")
    write_text_atomic(out / "report.md", table + "\n")
    figures = out / "figures"
    loss_png = plot_losses({a: out / "students" / a for a in ("kd", "dskd")}, figures / "losses.png")
    from dskd.plots import plot_diagnostics

    diag_png = plot_diagnostics({a: out / "students" / a for a in ("kd", "dskd")}, figures / "diagnostics.png")
    tsne_png = figures / "senses_tsne.png"
    try:
        from dskd.plots import FIGURE1_WORDS, senses_figure

        text = [c for c in cfg.senses.corpus if c != PROMPTS_CORPUS] or ["default"]
        senses_figure(cfg.model.teacher, FIGURE1_WORDS, tsne_png, corpus=text, k=cfg.senses.k)
    except Exception as e:  # a picture must never sink a finished run
        print(f"(sense t-SNE skipped: {e})")
        tsne_png = None
    result.update(report=out / "report.md", figures=[p for p in (loss_png, diag_png, tsne_png) if p])
    print("\n" + table)
    print(f"\nwrote: {out}/report.md, {', '.join(str(p) for p in result['figures'])}")
    print(f"stage times (s): {json.dumps({k: round(v, 1) for k, v in pipe.timings.items()})}")
    print(f"total {time.time() - t0:.0f}s")
    return result


def _one_process(command: str) -> None:
    """Refuse ``command`` under several processes (``WORLD_SIZE`` > 1), before any work."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{command} runs in one process (its evaluations come between the trainings); under accelerate "
            "launch, train the students with `dskd run` / `dskd distill`, then run the experiment in one process"
        )


def experiment(
    cfg: RunConfig,
    *,
    seeds: int = 3,
    arms: list[str] | None = None,
    force: bool = False,
    report_name: str = "experiment",
    baseline: str = "kd",
) -> Path:
    """Arms x seeds sharing the lexicon, sense store and teacher cache; writes ``<report_name>.md``: accuracy
    and held-out fidelity (``eval/<report_name>_fidelity.json``) of every arm against the baseline.

    Seed 0 (the recipe's ``distill.seed``) of an arm is the student ``dskd run`` trains for it
    (``students/<arm>/``); seed s > 0 lives in ``students/<arm>/seed<distill.seed + s>/``."""
    from dskd.devices import check_required_accelerator

    check_required_accelerator(cfg.model.require_accelerator)  # before any work
    _one_process("dskd experiment")  # its evaluations come between trainings
    arms = list(arms or DEFAULT_ARMS)
    if baseline not in arms:
        arms.insert(0, baseline)
    for a in arms:
        _arm_config(cfg, a)  # validates the names and their overrides before any work
    if seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1 (got {seeds})")
    out = cfg.out_dir
    pipe = Pipeline(out, force=force)
    from dskd.config import dump_yaml
    from dskd.models import resolve_spec

    dump_yaml(cfg, out / "config.yaml")
    print(f"dskd experiment: {cfg.name}, arms {arms}, seeds {seeds} -> {out}")
    shared = prepare_shared(cfg, pipe)
    files: dict[str, dict[int, Path]] = {}
    untrained = export_untrained(cfg, pipe)
    # bounded by its cap however many students: only misses store, and every student hits the teacher's
    memo = shared_prefix_memo(cfg, untrained)
    refs = {
        "teacher": evaluate_model(cfg, pipe, "teacher", resolve_spec(cfg.model.teacher), "", memo=memo),
        "untrained": evaluate_model(
            cfg, pipe, "untrained", str(untrained), _upstream(pipe, "train:untrained"), memo=memo
        ),
    }
    base_seed = cfg.distill.seed
    students: dict[str, Path] = {"untrained": untrained}
    keys: dict[str, list[str]] = {}
    for s in range(seeds):
        for arm in arms:  # seed-major order: an interrupted experiment still has paired arms
            # the recipe's own seed is the run's student (students/<arm>): `dskd run` then `dskd experiment`
            # trains only the other seeds and arms
            seed = None if s == 0 else base_seed + s
            student = train_arm(cfg, pipe, shared, arm, seed=seed)
            key = arm_key(arm, seed)
            students[key] = student
            keys.setdefault(arm, []).append(key)
            files.setdefault(arm, {})[base_seed + s] = evaluate_model(
                cfg, pipe, key, str(student), _upstream(pipe, f"train:{key}"), memo=memo
            )
    # held-out fidelity and the sense probe of every student, in one teacher pass
    fid = fidelity_stage(cfg, pipe, shared, students, name=f"{report_name}_fidelity", memo=memo)
    from dskd.fidelity import load_result as load_fidelity
    from dskd.fidelity import pooled_markdown
    from dskd.report import answer_gap_table, experiment_table, load_result, training_diagnostics_section

    table = experiment_table(files, refs, baseline=baseline, descriptions={a: parse_arm(a)[2] for a in arms})
    gap = answer_gap_table({a: [load_result(p) for _, p in sorted(f.items())] for a, f in files.items()}, baseline)
    table += f"\n{gap}" if gap else ""
    table += "\n" + pooled_markdown(load_fidelity(fid), keys, baseline)
    diag = training_diagnostics_section({k: out / "students" / k for ks in keys.values() for k in ks})
    table += f"\n{diag}" if diag else ""
    write_text_atomic(out / f"{report_name}.md", table + "\n")
    write_json(
        out / f"{report_name}.json",
        {
            "arms": arms,
            "seeds": seeds,
            "files": {a: {str(s): str(p) for s, p in f.items()} for a, f in files.items()},
            "refs": {k: str(v) for k, v in refs.items()},
            "fidelity": str(fid),
        },
    )
    plot_losses(
        {f"{a}/seed{base_seed + i}": out / "students" / k for a, ks in keys.items() for i, k in enumerate(ks)},
        out / "figures" / f"{report_name}_losses.png",
    )
    from dskd.plots import plot_diagnostics

    plot_diagnostics(
        {f"{a}/seed{base_seed + i}": out / "students" / k for a, ks in keys.items() for i, k in enumerate(ks)},
        out / "figures" / f"{report_name}_diagnostics.png",
    )
    print("\n" + table)
    print(f"\nwrote {out / f'{report_name}.md'}")
    return out / f"{report_name}.md"


def run_command(cfg: RunConfig, quick: bool = False, until: str = "report", force: bool = False) -> dict[str, Any]:
    """The main job: assets -> lexicon -> sense dictionary -> teacher cache -> KD and DSKD students ->
    evaluation of teacher, untrained student, KD and DSKD -> held-out fidelity -> report table and pictures.
    Stages whose outputs exist and match their inputs are skipped; an interrupted run continues.

    Example: dskd run --config configs/smollm2-135m_to_15l.yaml [--quick] [--loss.lam 1.5]

    Args:
        cfg: The recipe.
        quick: Small budgets (a few minutes on 2 cores); output in <out>-quick.
        until: Stop after this stage: assets, lexicon, senses, cache, students, eval, fidelity, report.
        force: Rebuild every stage even when up to date.
    """
    return run(quick_config(cfg) if quick else cfg, until=until, force=force)


def experiment_command(
    cfg: RunConfig,
    seeds: int = 3,
    arms: list[str] = list(DEFAULT_ARMS),  # noqa: B006  (read only; the parser shows it as the default)
    report_name: str = "experiment",
    baseline: str = "kd",
    quick: bool = False,
    force: bool = False,
) -> Path:
    """Paired arms over seeds, sharing the lexicon, sense store and teacher cache; reports per task the
    mean of each arm and the paired difference against KD with its bootstrap confidence interval, and the
    held-out fidelity (KL to the teacher, top-1 agreement, perplexity, sense probe) of each arm, its seeds
    pooled, against KD. The first seed of each arm is the student `dskd run` trains for it (reused).

    Arms: kd (logit KD + CE, lambda = 0), dskd (KD + CE + sense loss), hidden_mse (KD + CE + direct MSE
    to the teacher's last hidden state), dskd_no_ant, dskd_no_syn, dskd_no_self, dskd_ref. Any arm takes
    overrides, e.g. dskd@margin_quantile=0.1@lam=2 or kd@distill.epochs=6 (a bare key is a loss field).

    Example: dskd experiment --config configs/smollm2-135m_to_15l.yaml --seeds 3 --arms kd,dskd,hidden_mse

    Args:
        cfg: The recipe.
        seeds: Seeds per arm.
        arms: The arms, with optional @key=value overrides; the baseline arm is always included.
        report_name: Stem of the table and JSON written in the run folder; use another for a sweep.
        baseline: Arm the others are compared with (always run).
        quick: Small budgets, for a smoke test.
        force: Rebuild every stage even when up to date.
    """
    arms = [a.strip() for a in arms if a.strip()]
    return experiment(
        quick_config(cfg) if quick else cfg,
        seeds=seeds,
        arms=arms,
        force=force,
        report_name=report_name,
        baseline=baseline,
    )
