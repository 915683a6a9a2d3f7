"""tests/gpu_check.py is run by hand on a machine with a GPU; its --smoke mode runs the same stages on tiny
configs on the CPU (torch.compile with an eager backend), so that the script is known to work before device
time is spent on it."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # about 40 s: both methods of all four scripts, twice each, on tiny configs
def test_gpu_check_smoke_runs_every_stage_of_every_script(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["script"], r["method"]) for r in report["results"]] == [
        (s, m) for s in ("toy", "text", "mnist", "cifar") for m in ("mdm", "vadd")]
    for r in report["results"]:
        assert r["errors"] == {}, r["errors"]
        assert r["runs"]["resumed"] and r["runs"]["sampling"] and r["step"]["throughput"] > 0
        assert r["runs"]["graphs_first_run"] == 1 and r["runs"]["graphs_resumed_run"] == 0  # no recompilation
        assert r["step"]["loss_relative_difference"] < 0.05
    assert "| cifar | vadd |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_records_a_failing_stage_and_goes_on(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check

    def broken(*args, **kwargs):
        raise SystemExit("the script stopped")

    monkeypatch.setattr(gpu_check, "stage_runs", broken)
    report = gpu_check.main(["--smoke", "--only", "toy", "--out", str(tmp_path)])
    assert [r["method"] for r in report["results"]] == ["mdm", "vadd"]
    for r in report["results"]:
        assert "the script stopped" in r["errors"]["runs"] and r["step"]["throughput"] > 0
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["results"][1]["errors"]["runs"].strip().endswith("SystemExit: the script stopped")
