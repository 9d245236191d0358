"""The model card (``README.md``) of an exported student, in the form the Hugging Face Hub renders.

YAML front matter (``base_model``, ``license``, ``library_name: transformers``, ``tags``), then the
teacher and its licence, the recipe, the dskd version, the training summary (from the run's
``meta.json`` and ``metrics.jsonl``) and, when the run has them, evaluation results (``dskd run``
rewrites the card after its evaluation stage).

The teacher's licence is read from the teacher folder's own model card (its front matter ``license``),
else from a table of known teachers; an unknown licence is written ``unknown``, never guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from dskd.io import write_text_atomic

# hub ids of the packaged aliases (dskd.models.ALIASES): the packaged SmolLM2 is its GGUF export
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ALIAS_NOTES = {
    "smollm2-135m-instruct": "the packaged teacher is SmolLM2-135M-Instruct dequantized to float32 from its Q4_1 "
    "GGUF release (`dskd assets`), not the original bfloat16 weights"
}
# (hub id prefix, licence id as the Hub spells it), first match wins
KNOWN_LICENSES = (
    ("HuggingFaceTB/SmolLM2", "apache-2.0"),
    ("HuggingFaceTB/SmolLM", "apache-2.0"),
    ("meta-llama/Meta-Llama-3-", "llama3"),
    ("meta-llama/Llama-3.1-", "llama3.1"),
    ("meta-llama/Llama-3.2-", "llama3.2"),
    ("meta-llama/Llama-2-", "llama2"),
    ("mistralai/Mistral-7B", "apache-2.0"),
    ("Qwen/Qwen2.5-", "apache-2.0"),
)
TAGS = ["dskd", "knowledge-distillation", "distillation"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when it has none or it does not parse)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model(teacher: str) -> str | None:
    """The teacher's hub id: an alias's, a hub id itself, or a local folder's ``_name_or_path`` (config.json)
    when that is a hub id; None when unknown (the card then names the teacher without ``base_model``)."""
    if teacher in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[teacher]
    p = Path(teacher).expanduser()
    if p.is_dir():
        try:
            name = json.loads((p / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError):
            return None
        return name if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() else None
    return teacher if _HUB_ID.match(teacher) else None


def teacher_license(teacher: str) -> tuple[str, str]:
    """(licence id, where it came from) of a teacher: its folder's card, else the known table, else unknown."""
    card = Path(teacher).expanduser() / "README.md"
    if card.is_file():
        lic = front_matter(card.read_text(errors="replace")).get("license")
        if isinstance(lic, str) and lic:
            return lic, f"the teacher's model card ({card})"
    hub = base_model(teacher) or teacher
    for prefix, lic in KNOWN_LICENSES:
        if hub.startswith(prefix):
            return lic, f"dskd's table of known teachers ({prefix}*)"
    return "unknown", "not found (no licence in the teacher's card, not a known teacher): check it before sharing"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _training_section(meta: dict[str, Any], last: dict[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    cfg = meta.get("config", {})
    model, dist, loss = meta.get("model", {}), cfg.get("distill", {}), cfg.get("loss", {})
    if "steps" not in meta:  # the untrained student dskd run evaluates as a baseline
        student = model.get("student", {})
        return [*lines, f"Not trained: the teacher's first {student.get('layers')} decoder layers, as a baseline.", ""]
    kind = "DSKD (KD + sense loss)" if loss.get("lam", 0) > 0 else "KD (logit distillation + cross-entropy)"
    lines.append(f"- Method: {kind}; divergence {loss.get('divergence')}, T {loss.get('T')}, alpha {loss.get('alpha')}")
    student = model.get("student", {})
    if student.get("kind") == "truncated":
        lines.append(
            f"- Student: the teacher's first {student.get('layers')} of {model.get('teacher_layers')} decoder layers, "
            f"top {model.get('trainable_layers')} trained ({model.get('trainable_params'):,} of "
            f"{model.get('total_params'):,} parameters)"
        )
    elif student:
        lines.append(f"- Student: `{student.get('spec')}` ({model.get('trainable_params', 0):,} trainable parameters)")
    lines.append(
        f"- Optimisation: {meta.get('steps')} steps, {meta.get('tokens'):,} target tokens, lr {dist.get('lr')}, "
        f"batch {dist.get('batch_size')} x accumulation {dist.get('grad_accum')} x {meta.get('processes')} process(es), "
        f"precision {dist.get('precision')}, {meta.get('train_seconds')} s"
    )
    if last:
        terms = ", ".join(f"{k} {_fmt(last[k])}" for k in ("loss", "ce", "kd", "sense", "hidden") if k in last)
        lines.append(f"- Last logged step ({last.get('step')}): {terms}")
    return [*lines, ""]


def _eval_section(results: dict[str, Path]) -> list[str]:
    rows = []
    for name, path in results.items():
        d = json.loads(Path(path).read_text())
        for task, t in d.get("tasks", {}).items():
            metric = t.get("primary") or next(iter(t.get("metrics", {})), None)
            if metric is None:
                continue
            err = t["metrics"].get(f"{metric}_stderr")
            value = f"{t['metrics'][metric]:.4f}" + (f" ± {err:.4f}" if err is not None else "")
            rows.append(f"| {name} | {t.get('title', task)} | {t.get('n')} | {metric} | {value} |")
    if not rows:
        return []
    return ["## Evaluation", "", "| Set | Task | Items | Metric | Value |", "|---|---|---|---|---|", *rows, ""]


def render(meta: dict[str, Any], metrics_file: Path, results: dict[str, Path] | None = None) -> str:
    """The card of a run's student from its sidecar (``meta.json``) and ``metrics.jsonl``."""
    cfg = meta.get("config", {})
    teacher = cfg.get("model", {}).get("teacher", "")
    lic, lic_source = teacher_license(teacher)
    base = base_model(teacher)
    fm: dict[str, Any] = {}
    if base:
        fm["base_model"] = base
    fm |= {"license": lic, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS}
    lines_ = [x for x in metrics_file.read_text().splitlines() if x.strip()] if metrics_file.is_file() else []
    last = json.loads(lines_[-1]) if lines_ else None
    name = cfg.get("name", "student")
    out = [
        "---",
        yaml.safe_dump(fm, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}: a student distilled from {base or teacher}",
        "",
        f"Distilled with dskd {meta.get('dskd_version')} (Decoder-based Sense Knowledge "
        f"Distillation) from the teacher `{teacher}`. A plain Hugging Face folder: it loads with "
        "`AutoModelForCausalLM.from_pretrained` without dskd.",
        "",
        *([f"Note: {ALIAS_NOTES[teacher]}.", ""] if teacher in ALIAS_NOTES else []),
        "## Licence",
        "",
        f"The student is derived from the teacher's weights and inherits its licence: **{lic}** "
        f"(read from {lic_source}).",
        "",
        *_training_section(meta, last),
        *(_eval_section(results) if results else []),
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


def write_card(run_dir: Path, student_dir: Path | None = None, results: dict[str, Path] | None = None) -> Path:
    """Write (atomically) ``README.md`` into the student folder of a run; ``results``: evaluation JSON files
    (``dskd eval`` / ``dskd run``) by set name, added as a table."""
    student_dir = Path(student_dir) if student_dir is not None else Path(run_dir) / "student"
    path = student_dir / "README.md"
    meta = json.loads((Path(run_dir) / "meta.json").read_text())
    write_text_atomic(path, render(meta, Path(run_dir) / "metrics.jsonl", results))
    return path


__all__ = ["base_model", "front_matter", "render", "teacher_license", "write_card"]
