"""A non-editable install works: the wheel holds the product (rewiring, its experiment layer and
report templates, tasks) and not the benchmarks, and its commands run outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (no deps, no build isolation: offline) into a folder of its own."""
    root = tmp_path_factory.mktemp("install")
    wheels, target = root / "wheels", root / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    had_build = (REPO / "build").exists()
    try:
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                       check=True, cwd=root)  # fmt: skip
    finally:
        if not had_build:  # setuptools builds in the tree; leave no second copy of the sources there
            shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = wheels.glob("rewiring-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rewiring/experiment/report/templates/report.md.j2" in names
    assert any(n.startswith("tasks/") for n in names)
    assert not any(n.startswith("benchmarks/") for n in names)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=root)
    return target


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # the installed copy first, and the checkout nowhere on the path
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-m", "rewiring", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_the_installed_commands_run_outside_the_checkout(installed, tmp_path, tiny_corpus):
    out = _run(installed, "--help", cwd=tmp_path)
    assert out.returncode == 0 and "usage: rewiring" in out.stdout, out.stderr
    where = subprocess.run([sys.executable, "-c", "import rewiring; print(rewiring.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.startswith(str(installed)), where.stdout
    bench = _run(installed, "bench", cwd=tmp_path)
    assert bench.returncode != 0 and "needs the source checkout" in bench.stdout + bench.stderr
    # a fit from the installed copy: configs and data from outside it
    fit = _run(
        installed, "fit",
        "--config", str(REPO / "conf/base.yaml"), "--config", str(REPO / "conf/encoder/tiny-random.yaml"),
        "--config", str(REPO / "conf/tasks/ks.yaml"),
        f"--data.init_args.root={tiny_corpus}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--model.init_args.feature_cache={tmp_path / 'f'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
