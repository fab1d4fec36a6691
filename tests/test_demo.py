"""nnssl_demo runs the whole workflow (a tiny budget here; the default budget is measured in the README)."""

import json
import os
import subprocess
import sys

from conftest import nnunet_env


def test_demo_smoke(tmp_path):
    work = str(tmp_path / "demo")
    code = ("from nnssl.commands.demo import run_demo\n"
            f"run_demo({work!r}, epochs=1, iters=2, val_iters=1, labeled='3', synthetic_cases=(10, 3, 2))\n")
    env = nnunet_env(str(tmp_path))  # the demo must ignore the user's nnU-Net folders and use its own
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.load(open(os.path.join(work, "demo_results.json")))
    assert [r["trainer"] for r in results["rows"]] == ["nnUNetTrainer", "nnSSL_MeanTeacherTrainer"]
    for row in results["rows"]:
        assert set(row["dice"]) == {"anterior", "posterior"}
    for f in ("demo_results.md", "demo_results.png", "demo_log.txt"):
        assert os.path.isfile(os.path.join(work, f))
    assert not os.path.exists(os.path.join(str(tmp_path), "res"))  # nothing written to the user's nnUNet_results
    p = subprocess.run([sys.executable, "-m", "nnssl.commands.demo", "-o", work], env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "--overwrite" in p.stderr
