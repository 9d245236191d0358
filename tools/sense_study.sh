#!/usr/bin/env bash
# The pre-registered sense study of results/smollm2-135m_to_24l/sense_study.md (issue 24), on 2 CPU cores.
#
#   tools/sense_study.sh screen            # seed 0: every arm against the existing KD student (~1.5 h)
#   tools/sense_study.sh confirm ARM...    # seeds 1-2 of the arms that passed the screen, with kd and hidden_mse
#   tools/sense_study.sh table             # (re)write the screen's combined table (screen runs it at its end)
#
# Needs the main job's run folder ($MAIN, default runs/smollm2-135m_to_24l; `dskd run --config $C` makes
# it): its lexicon, sense store, teacher cache and students are reused through hard links (every dskd
# write is a temporary file renamed into place, so the main folder is never changed), so the screen
# trains only the new arms. Everything the study writes is in $STUDY (default runs/sense_study) and
# $STUDY-k10 (the k = 10 store). DSKD="python -m dskd" runs a checkout without installing it.
set -euo pipefail
C=${C:-configs/smollm2-135m_to_24l.yaml}
MAIN=${MAIN:-runs/smollm2-135m_to_24l}
A=${STUDY:-runs/sense_study}
B=$A-k10
DSKD=${DSKD:-dskd}
PY=${PY:-python}
EVAL=(--eval.limit 1000)
# the screen's arms (dskd_no_self: no self-sense terms; kappa = 5 of the recipe with k = 10 is the $B folder)
SCREEN=kd,dskd,hidden_mse,dskd@lam=0.3,dskd_no_self,dskd@positive_margin_mode=teacher,dskd@sense_scale=variance,dskd@sense_scale=grad_share

link() {  # $1: source run folder; $2: study folder; $3...: what to reuse (paths inside them) when absent there
  local src=$1 dst=$2
  shift 2
  mkdir -p "$dst/students"
  for p in "$@"; do
    if [ -e "$src/$p" ] && [ ! -e "$dst/$p" ]; then
      mkdir -p "$(dirname "$dst/$p")"
      cp -al "$src/$p" "$dst/$p"
    fi
  done
}

table() {
  "$PY" - "$A" "$B" <<'EOF'
import json, sys
from pathlib import Path
from dskd.fidelity import load_result as load_fid, markdown as fid_md, pooled_markdown
from dskd.io import write_text_atomic
from dskd.report import answer_gap_table, experiment_table, load_result, training_diagnostics_section

a, b = Path(sys.argv[1]), Path(sys.argv[2])
sa = json.loads((a / "screen.json").read_text())
files = {arm: {int(s): Path(p) for s, p in f.items()} for arm, f in sa["files"].items()}
runs = {arm: a / "students" / arm for arm in files}
k10 = b / "screen_k10.json"
if k10.is_file():  # the k = 10 store's DSKD student, paired with the same KD student's items
    sb = json.loads(k10.read_text())
    files["dskd_k10_kappa5"] = {int(s): Path(p) for s, p in sb["files"]["dskd"].items()}
    runs["dskd_k10_kappa5"] = b / "students" / "dskd"
desc = {"dskd_k10_kappa5": "KD + CE + sense loss, k = 10 senses per token (same 100k-position store), kappa = 5"}
table = "# Sense study: screen at seed 0, eval.limit 1000 (pre-registered in sense_study.md)\n\n"
table += experiment_table(files, {k: Path(v) for k, v in sa["refs"].items()}, baseline="kd", descriptions=desc)
table += "\n" + answer_gap_table({arm: [load_result(p) for p in f.values()] for arm, f in files.items()}, "kd")
table += "\nheld-out fidelity (k = 5 arms):\n\n" + pooled_markdown(load_fid(sa["fidelity"]), {k: [k] for k in sa["files"]}, "kd")
if k10.is_file():
    table += "\nheld-out fidelity (k = 10 store; its own KD row is the same student):\n\n" + fid_md(load_fid(sb["fidelity"]), "kd")
table += "\n" + training_diagnostics_section(runs)
write_text_atomic(a / "screen_table.md", table)
print(table)
print(f"wrote {a / 'screen_table.md'}")
EOF
}

case "${1:-}" in
screen)
  [ -d "$MAIN/students/kd" ] || { echo "no $MAIN/students/kd: run \`$DSKD run --config $C\` first" >&2; exit 2; }
  shared=(lexicon senses senses_coverage.json prompts.jsonl prompts.jsonl.meta.json teacher_cache
    students/untrained students/kd students/dskd students/hidden_mse)
  link "$MAIN" "$A" "${shared[@]}"
  "$DSKD" experiment --config "$C" --out "$A" "${EVAL[@]}" --seeds 1 --arms "$SCREEN" --report-name screen
  # k = 10 senses (kappa = 5 from the recipe): its own store; KD does not read the store, so its student is reused
  link "$MAIN" "$B" lexicon prompts.jsonl prompts.jsonl.meta.json teacher_cache students/untrained students/kd
  "$DSKD" experiment --config "$C" --out "$B" --senses.k 10 "${EVAL[@]}" --seeds 1 --arms kd,dskd --report-name screen_k10
  table
  ;;
confirm)
  shift
  [ $# -ge 1 ] || { echo "usage: $0 confirm ARM... (arms of the screen at >= +0.3 over kd; dskd_k10_kappa5 for the k = 10 arm)" >&2; exit 2; }
  arms=(kd hidden_mse)
  k10=0
  for arm in "$@"; do
    if [ "$arm" = dskd_k10_kappa5 ]; then k10=1; else arms+=("$arm"); fi
  done
  if [ ${#arms[@]} -gt 2 ]; then
    "$DSKD" experiment --config "$C" --out "$A" "${EVAL[@]}" --seeds 3 --arms "$(IFS=,; echo "${arms[*]}")" --report-name confirm
  fi
  if [ $k10 = 1 ]; then  # KD and hidden MSE read no sense store: their students (and seeds) come from $A
    link "$A" "$B" students/kd students/hidden_mse
    "$DSKD" experiment --config "$C" --out "$B" --senses.k 10 "${EVAL[@]}" --seeds 3 --arms kd,hidden_mse,dskd --report-name confirm_k10
  fi
  ;;
table) table ;;
*) sed -n 2,12p "$0"; exit 2 ;;
esac
