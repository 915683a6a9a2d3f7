"""tests/gpu_check.py is run by hand on a lent GPU; its --smoke mode runs the same code on tiny configs on the
CPU, so that the script is known to work before device time is spent on it."""
import json
import os
import subprocess
import sys


def test_gpu_check_smoke_runs_every_script_and_writes_its_table(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["script"], r["method"]) for r in report["results"]] == [
        (s, m) for s in ("toy", "text", "mnist", "cifar") for m in ("mdm", "vadd")]
    assert all(r["sampling"] and r["seconds"] > 0 for r in report["results"])
    assert "| cifar | vadd |" in (tmp_path / "gpu_check.md").read_text()
