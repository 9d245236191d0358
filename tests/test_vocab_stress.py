"""benchmarks/vocab_stress.py at tiny size: the project's gather and exact-KD paths run for a Llama and a
Gemma-3 text model, each part in its own process, and the table and JSON report what was measured."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vocab_stress_runs_at_tiny_size(tmp_path):
    out = tmp_path / "v.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "vocab_stress.py"),
        "--tiny",
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}
    assert rows["gemma3-270m"]["gather"]["vocab"] == 4096 and rows["smollm2-135m"]["gather"]["vocab"] == 1024
    for r in rows.values():
        assert r["gather"]["positions_per_s"] > 0 and r["kd"]["seconds_per_micro_batch"] > 0
        assert r["kd"]["targets"] == 2 * 31
    assert "| gemma3-270m | 4,096 |" in res.stdout and "gemma3-270m / smollm2-135m: vocab 4.00x" in res.stdout
