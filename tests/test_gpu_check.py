"""benchmarks/gpu_check.py in the mode that runs without CUDA: the script, its subprocess per part and
its verdicts work, so the first GPU only has CUDA left to settle (the full CPU run takes about a minute
on a busy 2-core machine; this runs the parts with the most machinery)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_its_cpu_parts_each_in_a_process(tmp_path: Path):
    out = tmp_path / "check.json"
    parts = "fallback_capture,fallback_replay,packing"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", parts,
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["parts"]
    assert list(results) == parts.split(",")
    assert {name: r["ok"] for name, r in results.items()} == {
        "fallback_capture": True, "fallback_replay": True, "packing": None}
    assert results["fallback_capture"]["line"].startswith("CUDA graphs off for this process, training eagerly: capture failed")
    assert "disagrees with the same step run eagerly" in results["fallback_replay"]["line"]
    table = done.stdout.splitlines()
    assert table[0].split()[:2] == ["part", "result"] and [row.split()[1] for row in table[1:]] == [
        "PASS", "PASS", "skip"]


def test_a_part_that_crashes_is_that_parts_failure():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    result = gpu_check.run_part("no_such_part", "cpu", quick=True, timeout=60)
    assert result["ok"] is False and result["measured"].startswith("crashed (exit 1): KeyError")
