"""The soak tool (``python -m benchmarks.soak``, ``make soak``) for a few seconds, so it cannot rot."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from benchmarks.soak import soak_config

from .conftest import ROOT, user_env

pytestmark = pytest.mark.slow


def small_config(folder):
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data["master"]["source"].update(shape=[256, 256], rate_hz=20)
    data["groups"]["main"].update(workers=1, steps=[{"roi_stats": {"rois": {"center": [100, 150, 100, 150]}}}])
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_soak_runs_prints_rows_and_saves_a_summary(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.15", "--every", "3", "--scan-frames", "40",
         "--config", str(small_config(tmp_path)), "--workdir", str(tmp_path / "work"), "--out", str(out)],
        env=user_env(tmp_path / "unused-state"), cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "master/1" in proc.stdout and "missing" in proc.stdout  # the table's header
    summary = json.loads(out.read_text())
    assert set(summary["rss"]) == {"master/1", "worker/main-1", "sorter/main", "sink/1", "writer/hdf5", "db"}
    assert all(r["max_mb"] > 0 and "growth_mb" in r for r in summary["rss"].values())
    frames = summary["frames"]
    assert frames["sent"] > 0 and frames["processed"] == frames["sent"] == frames["written"]
    assert frames["dropped"] == frames["missing"] == 0 and summary["scans"] >= 1
    assert not summary["processes_died"]
    with open(summary["samples_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 5 and "rss_mb_master/1" in rows[0]
    assert not list((tmp_path / "work" / "data").rglob("*.h5"))  # files deleted once counted


def test_soak_config_applies_the_overrides(tmp_path):
    path = soak_config(ROOT / "config" / "demo.yaml", tmp_path, rate_hz=50, policy="drop_oldest", step_ms=400)
    data = yaml.safe_load(path.read_text())
    assert data["master"]["source"]["rate_hz"] == 50 and data["master"]["overflow_policy"] == "drop_oldest"
    assert data["groups"]["main"]["steps"] == [{"benchmarks.soak:paced": {"ms": 400}}]
    assert data["sink"]["lavue"]["port"] == 0
    assert data["writers"]["hdf5"]["directory"] == str(tmp_path / "data" / "hdf5")
