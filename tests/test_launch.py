"""launch/slurm.sbatch requeues itself after a stop at a checkpoint, and only then (srun and scontrol stubbed)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_sbatch(tmp_path, summary, rc=0, restarts=0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    workdir = tmp_path / "run"
    # srun: the trainer's stand-in, which leaves `summary` (or none) in the work directory and exits with rc
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        + (
            f"mkdir -p {workdir} && echo '{json.dumps(summary)}' > {workdir}/summary.json\n"
            if summary is not None
            else ""
        )
        + f"exit {rc}\n"
    )
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_RESTART_COUNT=str(restarts),
        MCNN_VENV=str(tmp_path / "novenv"),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/tiny.py", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    return proc, calls


@pytest.mark.parametrize(
    "summary, rc, restarts, requeued",
    [
        ({"final_step": 10, "preempted_at_step": 10}, 0, 0, True),  # stopped at a checkpoint before the time limit
        ({"final_step": 10, "preempted_at_step": 10}, 0, 20, False),  # MCNN_MAX_REQUEUES reached
        ({"final_step": 100}, 0, 3, False),  # finished
        (None, 2, 0, False),  # failed: not rerun
    ],
)
def test_slurm_script_requeues_only_a_run_stopped_at_a_checkpoint(tmp_path, summary, rc, restarts, requeued):
    proc, calls = run_sbatch(tmp_path, summary, rc, restarts)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert (calls.strip() == "requeue 42") == requeued, proc.stdout + proc.stderr
    assert "#SBATCH --requeue" in (ROOT / "launch" / "slurm.sbatch").read_text()
