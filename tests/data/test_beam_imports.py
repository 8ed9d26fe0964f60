"""Beam stays out of everything but `minicpm data process` and its bench rows: importing the data pipeline, the
local preparation, the grain pipeline or the CLI does not import apache_beam."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_pipeline_and_cli_do_not_import_beam():
    code = ("import sys, data_pipeline, data_pipeline.prepare, data_pipeline.pipeline, data_pipeline.bench, "
            "minicpm_jax.cli; print(sorted(m for m in sys.modules if m.startswith(('apache_beam', 'datasketch'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
