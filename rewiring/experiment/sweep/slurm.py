"""`--launcher slurm`: the sweep as SLURM job arrays, written, not submitted.

runs/<sweep>/slurm/ gets the resolved spec, a job array over the runs (index i calls `rewiring
sweep --config spec.yaml --index i`: the same fit and test commands, the same resume rules), a job
array for missing rewired encoders, and submit.sh, which chains them and the report with sbatch
dependencies.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from rewiring.experiment.sweep.commands import python
from rewiring.experiment.sweep.spec import SweepSpec

if TYPE_CHECKING:  # for the annotation only: runners does not import this module
    from rewiring.experiment.sweep.runners import Sweep


def _sbatch_header(spec: SweepSpec, job: str, array: str, log_dir: Path) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.name}-{job}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={log_dir}/{job}-%A_%a.out",
    ]
    directives = spec.rewire_slurm if job == "rewire" and spec.rewire_slurm is not None else spec.slurm
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items()]
    return lines + ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]


def write_slurm(sweep: Sweep) -> Path:
    """runs/<sweep>/slurm/: spec.yaml, rewire.sbatch (if encoders are missing), runs.sbatch, submit.sh."""
    spec = sweep.spec
    d = spec.root / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    spec_file = d / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(asdict(spec), sort_keys=False))
    sweep.write_plan()
    py = shlex.join([*python(), "sweep", "--config", str(spec_file)])
    missing = sweep.missing_encoders()
    submit = [
        "#!/bin/bash",
        "# Submit the sweep: rewiring stage, then the runs, then the report.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'dep=""',
    ]
    if missing:
        body = _sbatch_header(spec, "rewire", f"0-{len(missing) - 1}", d)
        body.append(f"ARMS=({' '.join(missing)})")
        body.append(f'{py} --rewire "${{ARMS[$SLURM_ARRAY_TASK_ID]}}"')
        (d / "rewire.sbatch").write_text("\n".join(body) + "\n")
        submit += [f"jid=$(sbatch --parsable {d / 'rewire.sbatch'})", 'dep="--dependency=afterok:${jid%%;*}"']
    limit = f"%{spec.jobs}" if spec.jobs > 1 else ""
    body = _sbatch_header(spec, "runs", f"0-{len(sweep.runs) - 1}{limit}", d)
    body.append("# index i: the i-th run of runs/<sweep>/sweep.json: fit (or resume), then test")
    body.append(f"{py} --index $SLURM_ARRAY_TASK_ID")
    (d / "runs.sbatch").write_text("\n".join(body) + "\n")
    report = shlex.join(
        [*python(), "compare", str(spec.root), "--out", str(spec.report_path)]
    )
    submit += [
        f"jid=$(sbatch --parsable $dep {d / 'runs.sbatch'})",
        f"sbatch --dependency=afterany:${{jid%%;*}} --job-name={spec.name}-report --output={d}/report-%j.out "
        f"--wrap {shlex.quote(report)}",
        'echo "submitted; progress: squeue -u $USER, logs in ' + str(d) + '"',
    ]
    (d / "submit.sh").write_text("\n".join(submit) + "\n")
    (d / "submit.sh").chmod(0o755)
    return d
