"""The prepared GPU check runs its GPU-free parts anywhere (`--dry`): a family end to end in bf16 against the stock
pipeline, and the dry-run estimates of the real-size networks, which must show gradient checkpointing's saving."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--families", "sd15", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    (sd15,) = res["families"]
    assert sd15["ok"] and sd15["preview"] and 0 < sd15["export_vs_library_rel"] < 0.05
    est = {(b["network"], tuple(b["extra"])): b["estimate_GiB"] for b in res["big"]}
    pixart = est[("pixart-xl", ())]
    assert est[("pixart-xl", ("train.gradient_checkpointing=true",))] < 0.5 * pixart < est[("sdxl", ())]
    report = (tmp_path / "gpu.md").read_text()
    assert "DRY RUN: no GPU was used." in report and "| sd15 | True | True |" in report
