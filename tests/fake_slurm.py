#!/usr/bin/env python3
"""A one-machine stand-in for SLURM's sbatch, srun, sacct and scontrol, for tests of the SLURM launch path.

Installed as symlinks named after the commands (see :func:`install`); the name it is called by picks the
command. State lives in ``$FAKE_SLURM_STATE``:

* ``sbatch FILE`` reads the ``#SBATCH`` lines (``--array``, ``--nodes``, ``--ntasks-per-node``,
  ``--job-name``), starts every array task's script in the background with the job variables SLURM sets
  (``SLURM_JOB_ID``, ``SLURM_ARRAY_*``, ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_JOB_NODELIST``,
  ...) and prints ``Submitted batch job <id>``.
* ``srun [--output F] [--error F] [--unbuffered] CMD...`` starts ``SLURM_NTASKS`` copies of ``CMD`` with
  ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_ID`` (``%j %A %a %t`` expanded in the file names), writes
  their pids to the state folder (so a test can signal the tasks) and exits with the worst status.
* ``scontrol requeue <job id>`` starts that job's script again with ``SLURM_RESTART_COUNT`` + 1.
* ``sacct`` lists the jobs whose tasks have ended, COMPLETED or FAILED by srun's exit status (a failed job
  then fails the sweep instead of being waited for).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_STATE", "/tmp/fake-slurm"))


def _expand(pattern: str, env: dict[str, str], task: int) -> str:
    job = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
    return (
        pattern.replace("%A", job)
        .replace("%a", env.get("SLURM_ARRAY_TASK_ID", "0"))
        .replace("%j", env["SLURM_JOB_ID"])
        .replace("%t", str(task))
    )


def _start(job_key: str) -> None:
    record = json.loads((STATE / "jobs" / f"{job_key}.json").read_text())
    env = {**os.environ, **record["env"], "SLURM_RESTART_COUNT": str(record["restarts"])}
    log = open(STATE / "logs" / f"{job_key}.{record['restarts']}.log", "w")
    subprocess.Popen(
        ["bash", record["script"]], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).resolve()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), flags=re.M))
    for folder in ("jobs", "logs", "pids"):
        (STATE / folder).mkdir(parents=True, exist_ok=True)
    counter = STATE / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 100))
    array = flags.get("array", "").split("%")[0]
    tasks = range(int(array.split("-")[0]), int(array.split("-")[-1]) + 1) if array else [None]
    nodes, per_node = int(flags.get("nodes", 1)), int(flags.get("ntasks-per-node", 1))
    for offset, task in enumerate(tasks):
        env = {
            "SLURM_JOB_ID": str(job_id + offset + (1 if task is not None else 0)),
            "SLURM_JOB_NAME": flags.get("job-name", "fake"),
            "SLURM_NTASKS": str(nodes * per_node),
            "SLURM_NTASKS_PER_NODE": str(per_node),
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NODELIST": "localhost",
            "SLURM_NODEID": "0",
        }
        key = str(job_id)
        if task is not None:
            env.update({"SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": str(task)})
            key = f"{job_id}_{task}"
        record = {"script": str(script), "env": env, "restarts": 0}
        (STATE / "jobs" / f"{key}.json").write_text(json.dumps(record))
        _start(key)
    print(f"Submitted batch job {job_id}")
    return 0


def srun(args: list[str]) -> int:
    output = error = None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            value = args.pop(0)
            output, error = (value, error) if flag == "--output" else (output, value)
    env = dict(os.environ)
    procs = []
    for task in range(int(env.get("SLURM_NTASKS", 1))):
        task_env = {**env, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_STEP_ID": "0"}
        out = _open_log(_expand(output, env, task)) if output else None
        err = _open_log(_expand(error, env, task)) if error else subprocess.STDOUT
        procs.append(subprocess.Popen(args, env=task_env, stdout=out, stderr=err))
    job_key = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
    if "SLURM_ARRAY_TASK_ID" in env:
        job_key += f"_{env['SLURM_ARRAY_TASK_ID']}"
    (STATE / "pids" / f"{job_key}.{env.get('SLURM_RESTART_COUNT', '0')}").write_text(
        " ".join(str(p.pid) for p in procs)
    )
    code = max((p.wait() for p in procs), key=abs)
    record = json.loads((STATE / "jobs" / f"{job_key}.json").read_text())
    if record["restarts"] == int(
        env.get("SLURM_RESTART_COUNT", "0")
    ):  # a requeued attempt's end is not the job's
        (STATE / "exit").mkdir(exist_ok=True)
        (STATE / "exit" / job_key).write_text(str(code))
    return code


def _open_log(path: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # slurmstepd creates the file wherever it is
    return open(path, "a")


def sacct(args: list[str]) -> int:
    """``JobID|State|NodeList`` of every job whose tasks ended (running ones are not listed)."""
    print("JobID|State|NodeList")
    for path in sorted((STATE / "exit").glob("*")) if (STATE / "exit").exists() else []:
        print(f"{path.name}|{'COMPLETED' if path.read_text() == '0' else 'FAILED'}|localhost")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] != ["requeue"]:
        return 0
    key = args[1]
    path = STATE / "jobs" / f"{key}.json"
    record = json.loads(path.read_text())
    record["restarts"] += 1
    path.write_text(json.dumps(record))
    (STATE / "exit" / key).unlink(missing_ok=True)  # pending again
    (STATE / "requeued.log").open("a").write(f"{key}\n")
    _start(key)
    return 0


def install(bin_dir: Path) -> None:
    """Symlink this file as sbatch, srun, sacct and scontrol into ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    me = Path(__file__).resolve()
    me.chmod(0o755)
    for name in ("sbatch", "srun", "sacct", "scontrol"):
        (bin_dir / name).symlink_to(me)


if __name__ == "__main__":
    command = Path(sys.argv[0]).name
    handlers = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "sacct": sacct}
    sys.exit(handlers[command](sys.argv[1:]))
