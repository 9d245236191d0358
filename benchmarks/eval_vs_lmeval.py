"""dskd eval vs lm-eval: throughput, scores and per-item agreement on the same items and prompts.

Rows (``--rows``, default all):

* ``loglik0``: 0-shot log-likelihood on ARC-Easy and ARC-Challenge (``--tasks``); cloze prompt
  ``Question: ...\\nAnswer:`` continued by `` <choice>``, built by each tool from the question.
* ``loglik5``: 5-shot log-likelihood on ARC-Challenge; the prompt with its 5 solved exemplars is
  rendered by dskd (``loglik_requests``) and handed to lm-eval verbatim (``doc_to_text: "{{prompt}}"``).
  With ``--exemplars fixed`` (the default) every question is shown the same 5 exemplars, the first
  5 validation questions (lm-eval's ``first_n`` sampler; MMLU's dev-shot convention), so dskd
  encodes them once per chunk and scores every question after their cached keys and values; with
  ``per-item`` each question draws its own (dskd's default for ARC), and only the choices of a
  question share its context. Target: dskd >= 4x lm-eval's items/s with identical accuracy.
* ``generate``: the paper protocol's greedy generation on SQuAD (1-shot chat, token F1) and
  ARC-Challenge (5-shot chat, parsed answer letter). dskd renders each prompt
  (``generation_prompt``); lm-eval gets it verbatim in a ``generate_until`` task with the same stop
  sequences and token budget. Target: identical generated strings for >= 98% of items and F1 /
  accuracy within 0.5 points. Both tools decode with transformers ``generate``, so the throughput
  ratio shows overheads around it, not a faster decoder (no speed target). ``--gen-limit`` caps
  these rows apart from the others (SQuAD prompts carry a passage and 50 new tokens: the slowest).

The items are the evaluation items of the packaged benchmark data (ARC test sets, the SQuAD
evaluation half), written to temporary JSONL files that lm-eval reads through task YAMLs this
script writes. Both tools run the same model (the packaged SmolLM2-135M-Instruct unless
``--model``) in float32 on the same threads and batch size. Throughput is items per second of each
tool's evaluation calls with the model loaded, after one untimed call of each (a process's first
forward pays one-time costs). Items are scored in chunks (``--chunk``) that alternate between the
tools, so load from other processes slows both alike; each chunk line also prints the process CPU
seconds of each tool, a check on a busy machine. The last column says PASS or FAIL per row against
its target.

Needs the ``bench`` extra: ``pip install -e ".[bench]"`` (lm-eval 0.4.13). Runs offline::

    python benchmarks/eval_vs_lmeval.py --limit 8 --chunk 4 --no-warmup   # a smoke test, minutes on 2 cores
    python benchmarks/eval_vs_lmeval.py --rows loglik5,generate --limit 200 --gen-limit 100  # the measurement, ~15-20 min
    python benchmarks/eval_vs_lmeval.py --limit 0 --rows loglik0  # the full ARC test sets, 0-shot
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = ("loglik0", "loglik5", "generate")

YAML_MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
CLOZE = "Question: {{question}}\\nAnswer:"
VERBATIM = "{{prompt}}"

YAML_GEN = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: {until}
  max_gen_toks: {budget}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_chunks(folder: Path, name: str, docs: list[dict], chunk: int, yaml: str, **fmt) -> list[str]:
    """JSONL chunks of ``docs`` and an lm-eval task YAML per chunk; returns the task names."""
    names = []
    for k in range(0, len(docs), chunk):
        task = f"lmeval_{name}_{k // chunk}"
        data = folder / f"{task}.jsonl"
        with data.open("w") as f:
            for d in docs[k : k + chunk]:
                f.write(json.dumps(d) + "\n")
        (folder / f"{task}.yaml").write_text(yaml.format(name=task, data=data, **fmt))
        names.append(task)
    return names


def run_lmeval(lm, manager, task: str) -> tuple[float, float, list[dict]]:
    """Seconds and CPU seconds of one lm-eval call, and its logged samples in document order."""
    import lm_eval

    dt, cpu, res = _timed(lm_eval.simple_evaluate, model=lm, tasks=[task], task_manager=manager, log_samples=True)
    return dt, cpu, sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=v.__getitem__)


def _timed(fn, *a, **k):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return time.perf_counter() - t0, time.process_time() - c0, out


def fixed_exemplars(task, k: int):
    """A copy of ``task`` that shows every question its first ``k`` training items (lm-eval's ``first_n``)."""
    shots = task.train_items()[:k]
    fixed = copy.copy(task)
    fixed.exemplars = lambda item, n, seed=0: shots[:n]
    return fixed


class Bench:
    """The model, lm-eval's wrapper and the temporary task folder shared by all rows."""

    def __init__(self, args, folder: Path) -> None:
        import torch
        from lm_eval.models.huggingface import HFLM

        from dskd.models import load_model, load_tokenizer, resolve_spec

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.folder = folder
        model_dir = resolve_spec(args.model)
        self.model, self.tok = load_model(model_dir), load_tokenizer(model_dir)
        self.model.eval()
        self.lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=args.batch_size, device="cpu")
        self.manager = None
        self.torch = torch

    def manager_for(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.folder))

    def alternate(self, label: str, n_chunks: int, ours, theirs) -> tuple[float, float, list, list]:
        """Run ``ours(k)`` and ``theirs(k)`` on every chunk k, alternating which goes first."""
        if self.args.warmup:  # untimed: a process's first calls pay one-time costs
            ours(0), theirs(0)
        t = {"dskd": 0.0, "lmeval": 0.0}
        cpu = {"dskd": 0.0, "lmeval": 0.0}
        res: dict[str, list] = {"dskd": [], "lmeval": []}
        for k in range(n_chunks):
            for tool in ("dskd", "lmeval") if k % 2 == 0 else ("lmeval", "dskd"):
                dt, c, r = (ours if tool == "dskd" else theirs)(k)
                t[tool] += dt
                cpu[tool] += c
                res[tool].append(r)
            print(
                f"  {label}: chunk {k + 1}/{n_chunks}, dskd {t['dskd']:.1f}s (cpu {cpu['dskd']:.1f}s), "
                f"lm-eval {t['lmeval']:.1f}s (cpu {cpu['lmeval']:.1f}s)",
                flush=True,
            )
        return t["dskd"], t["lmeval"], res["dskd"], res["lmeval"]

    def race(self, tag: str, task, items: list, cfg, chunks: list) -> tuple[float, float, list, list]:
        """dskd's ``score_task`` on ``items`` and lm-eval on the same items written as ``chunks`` (one
        task folder each, ``args.chunk`` items), chunk by chunk (:meth:`alternate`)."""
        from dskd.evaluate import score_task

        manager, size = self.manager_for(), self.args.chunk

        def ours(k):
            return _timed(score_task, self.model, self.tok, task, items[k * size : (k + 1) * size], cfg)

        def theirs(k):
            return run_lmeval(self.lm, manager, chunks[k])

        return self.alternate(tag, len(chunks), ours, theirs)


# ---- log-likelihood rows -------------------------------------------------------------------------
def loglik_row(b: Bench, name: str, shots: int) -> dict:
    from dskd.config import EvalConfig
    from dskd.prompts import loglik_requests, select_items
    from dskd.tasks import get_task

    task = get_task(name)
    items = select_items(task, b.args.limit)
    chunk = b.args.chunk
    fixed = shots and b.args.exemplars == "fixed"
    if fixed:
        task = fixed_exemplars(task, shots)
    if shots:
        docs = []
        for x in items:
            reqs = loglik_requests(task, x, task.exemplars(x, shots), b.tok, chat=False)
            docs.append({"prompt": reqs[0][0], "choices": list(x.choices), "gold": x.gold})
        text = VERBATIM
    else:
        docs = [{"question": x.question, "choices": list(x.choices), "gold": x.gold} for x in items]
        text = CLOZE
    tag = f"{name}_{shots}shot"
    chunks = write_chunks(b.folder, tag, docs, chunk, YAML_MC, text=text)
    cfg = EvalConfig(tasks=[name], shots=shots, batch_size=b.args.batch_size, bootstrap=0)
    t_ours, t_theirs, r_ours, r_theirs = b.race(tag, task, items, cfg, chunks)
    pred = [p for e in r_ours for p in e["items"]["pred"]]
    pred_norm = [p for e in r_ours for p in e["items"]["pred_norm"]]
    ll_ours = [v for e in r_ours for v in e["items"]["loglik"]]
    ll_theirs = [[float(r[0]) for r in s["filtered_resps"]] for samples in r_theirs for s in samples]
    # lm-eval's predictions from its log-likelihoods, with its acc / acc_norm rules
    p_theirs = [_argmax(v) for v in ll_theirs]
    pn_theirs = [
        _argmax([s / len(c) for s, c in zip(v, x.choices, strict=True)]) for v, x in zip(ll_theirs, items, strict=True)
    ]
    gold = [x.gold for x in items]
    n = len(items)

    def acc(p):
        return sum(a == g for a, g in zip(p, gold, strict=True)) / n

    target = 4.0 if shots else 3.0
    same_acc = acc(pred) == acc(p_theirs) and acc(pred_norm) == acc(pn_theirs)
    how = (" (fixed exemplars)" if fixed else " (per-item exemplars)") if shots else ""
    return {
        "row": f"{name} {shots}-shot loglik{how}",
        "target": f">= {target:g}x, same acc and acc_norm",
        "pass": same_acc and t_theirs / t_ours >= target,
        "n": n,
        "dskd_items_per_s": n / t_ours,
        "lmeval_items_per_s": n / t_theirs,
        "ratio": t_theirs / t_ours,
        "dskd_score": acc(pred),
        "lmeval_score": acc(p_theirs),
        "dskd_acc_norm": acc(pred_norm),
        "lmeval_acc_norm": acc(pn_theirs),
        "disagree": sum(a != c for a, c in zip(pred, p_theirs, strict=True))
        + sum(a != c for a, c in zip(pred_norm, pn_theirs, strict=True)),
        "detail": f"acc_norm dskd {100 * acc(pred_norm):.2f}, lm-eval {100 * acc(pn_theirs):.2f}; max abs loglik diff "
        + f"{max(abs(a - c) for u, v in zip(ll_ours, ll_theirs, strict=True) for a, c in zip(u, v, strict=True)):.2e}",
        "metric": "acc",
    }


# ---- generation rows -----------------------------------------------------------------------------
def generate_row(b: Bench, name: str, shots: int) -> dict:
    from dskd.config import EvalConfig
    from dskd.generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_STOP, generation_prompt, parse_choice, squad_scores
    from dskd.presets import preset_items
    from dskd.tasks import get_task
    from dskd.tasks.base import LETTERS

    task = get_task(name)
    items = preset_items(task, b.args.limit if b.args.gen_limit is None else b.args.gen_limit)
    chunk = b.args.chunk
    budget = b.args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]
    stop = list(DEFAULT_STOP)
    prompts = [generation_prompt(task, x, task.exemplars(x, shots), b.tok, chat=True) for x in items]
    targets = [x.answers[0] if task.kind == "qa" else LETTERS[x.gold] for x in items]
    docs = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    tag = f"{name}_{shots}shot_gen"
    chunks = write_chunks(b.folder, tag, docs, chunk, YAML_GEN, until=json.dumps(stop), budget=budget)
    cfg = EvalConfig(
        tasks=[name],
        shots=shots,
        chat=True,
        scoring="generate",
        batch_size=b.args.batch_size,
        bootstrap=0,
        max_new_tokens=budget,
        stop=stop,
    )
    t_ours, t_theirs, r_ours, r_theirs = b.race(tag, task, items, cfg, chunks)
    gen_ours = [g for e in r_ours for g in e["items"]["generation"]]
    gen_theirs = [s["resps"][0][0] for samples in r_theirs for s in samples]
    n = len(items)
    if task.kind == "qa":

        def score(gens):
            return sum(squad_scores(g, x.answers)[1] for g, x in zip(gens, items, strict=True)) / n

        metric = "f1"
    else:

        def score(gens):
            return (
                sum(parse_choice(g, LETTERS[: len(x.choices)]) == x.gold for g, x in zip(gens, items, strict=True)) / n
            )

        metric = "acc"
    same = sum(a == c for a, c in zip(gen_ours, gen_theirs, strict=True))
    diffs = [(a, c) for a, c in zip(gen_ours, gen_theirs, strict=True) if a != c][:3]
    close = abs(score(gen_ours) - score(gen_theirs)) <= 0.005
    return {
        "row": f"{name} {shots}-shot chat generate",
        "target": ">= 98% identical, within 0.5 points",
        "pass": same / n >= 0.98 and close,
        "n": n,
        "dskd_items_per_s": n / t_ours,
        "lmeval_items_per_s": n / t_theirs,
        "ratio": t_theirs / t_ours,
        "dskd_score": score(gen_ours),
        "lmeval_score": score(gen_theirs),
        "identical_share": same / n,
        "disagree": n - same,
        "detail": f"identical strings {same}/{n} ({100 * same / n:.1f}%); budget {budget}, stop {stop!r}"
        + (f"; first differences {diffs!r}" if diffs else ""),
        "metric": metric,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="Model spec (alias, folder).")
    p.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows: {', '.join(ROWS)}.")
    p.add_argument("--tasks", default="arc_easy,arc_challenge", help="Tasks of the loglik0 row (ARC only).")
    p.add_argument("--limit", type=int, default=200, help="Items per row (0: every evaluation item).")
    p.add_argument("--gen-limit", type=int, default=None, help="Items per generate row (default: --limit).")
    p.add_argument(
        "--exemplars",
        choices=("fixed", "per-item"),
        default="fixed",
        help="loglik5: the same 5 exemplars for every question (default) or dskd's per-question draw.",
    )
    p.add_argument("--batch-size", type=int, default=8, help="Batch size of both tools.")
    p.add_argument("--chunk", type=int, default=20, help="Items per alternation between the two tools.")
    p.add_argument("--max-new-tokens", type=int, default=0, help="Generation budget (0: dskd's default per task).")
    p.add_argument(
        "--gen-tasks", default="squad,arc_challenge", help="Tasks of the generate row (squad 1-shot, others 5-shot)."
    )
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="One untimed call of each tool per row before timing (--no-warmup: for a quick agreement check).",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--json", type=Path, default=None, help="Also write the numbers to this JSON file.")
    args = p.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {', '.join(bad)} (known: {', '.join(ROWS)})")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise SystemExit('lm-eval is not installed: pip install -e ".[bench]"  (lm-eval==0.4.13)') from e

    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args, Path(tmp))
        print(
            f"model {args.model}, limit {args.limit}, generate limit {args.gen_limit}, batch size {args.batch_size}, "
            f"torch threads {b.torch.get_num_threads()}, chunks of {args.chunk} items alternating between the tools",
            flush=True,
        )
        results = []
        if "loglik0" in rows:
            results += [loglik_row(b, t, 0) for t in args.tasks.split(",") if t]
        if "loglik5" in rows:
            results.append(loglik_row(b, "arc_challenge", 5))
        if "generate" in rows:
            for t in args.gen_tasks.split(","):
                if t:
                    results.append(generate_row(b, t, 1 if t == "squad" else 5))
    print(
        "\n| row | n | metric | dskd | lm-eval | identical generations | dskd items/s | lm-eval items/s | ratio "
        "| items that differ | target | result |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    for r in results:
        same = f"{100 * r['identical_share']:.1f}%" if "identical_share" in r else "-"
        print(
            f"| {r['row']} | {r['n']} | {r['metric']} | {100 * r['dskd_score']:.2f} | {100 * r['lmeval_score']:.2f} | "
            f"{same} | {r['dskd_items_per_s']:.2f} | {r['lmeval_items_per_s']:.2f} | {r['ratio']:.2f}x | "
            f"{r['disagree']} | {r['target']} | {'PASS' if r['pass'] else 'FAIL'} |"
        )
    print()
    for r in results:
        print(f"- {r['row']}: {r['detail']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
