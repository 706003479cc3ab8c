"""docs/examples: valid scripts, flags that exist, grace periods that fit, and the exit-code
and signal handling of the spot loop, the multi-node sbatch script and the ssh script."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import grace_s, train_params

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _ftlaunch_line(script: Path) -> list[str]:
    text = script.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "ftlaunch --model" in line)
    args = shlex.split(line.split("ftlaunch", 1)[1].replace('"$@"', ""))
    return [a.replace('"', "") for a in args]


@pytest.mark.parametrize("name", ["spot-loop.sh", "slurm-single-node.sbatch",
                                  "slurm-multi-node.sbatch"])
def test_shell_examples_are_valid_and_use_real_flags(name):
    script = EXAMPLES / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    params = train_params(_ftlaunch_line(script))
    assert grace_s(params) > 0


def test_slurm_signal_comes_early_enough_for_the_grace():
    script = (EXAMPLES / "slurm-single-node.sbatch").read_text()
    signal_line = next(line for line in script.splitlines() if "--signal=" in line)
    warning = int(signal_line.rsplit("@", 1)[1])
    assert "B:TERM" in signal_line and "exec ftlaunch" in script
    params = train_params(_ftlaunch_line(EXAMPLES / "slurm-single-node.sbatch"))
    grace = grace_s(params)
    assert warning > grace


def test_kubernetes_job_gives_ftlaunch_its_grace_and_restarts_on_75():
    (job,) = yaml.safe_load_all((EXAMPLES / "k8s-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][0] == "ftlaunch"  # exec form: ftlaunch is PID 1
    params = train_params(container["command"][1:])
    assert pod["terminationGracePeriodSeconds"] > grace_s(params)
    rules = {rule["action"]: rule["onExitCodes"]["values"]
             for rule in job["spec"]["podFailurePolicy"]["rules"]}
    assert rules == {"Ignore": [75], "FailJob": [2]}


def _loop(tmp_path, codes: list[int]) -> tuple[int, list[str]]:
    """Run spot-loop.sh with a stand-in ftlaunch that exits with `codes` in turn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = bin_dir / "ftlaunch"
    fake.write_text("#!/bin/bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    f"n=$(wc -l < {calls})\n"
                    f"codes=({' '.join(map(str, codes))})\n"
                    "exit ${codes[$((n - 1))]}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PAUSE_SECONDS": "0"}
    proc = subprocess.run(["bash", str(EXAMPLES / "spot-loop.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, calls.read_text().splitlines()


def test_spot_loop_resumes_after_preemption_and_kills_until_done(tmp_path):
    code, calls = _loop(tmp_path, [75, 137, 143, 0])
    assert code == 0 and len(calls) == 4
    assert len(set(calls)) == 1  # the same command every time


def test_spot_loop_gives_up_on_user_errors_and_repeated_failures(tmp_path):
    code, calls = _loop(tmp_path / "a", [2])
    assert code == 2 and len(calls) == 1
    code, calls = _loop(tmp_path / "b", [1, 1, 1, 0])
    assert code == 1 and len(calls) == 3


MULTI_NODE_FLAGS = ("nnodes", "node_rank", "master_addr", "master_port")


def _stand_in(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _sbatch_options(script: Path) -> dict[str, str]:
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            for option in shlex.split(line[len("#SBATCH "):]):
                key, _, value = option.partition("=")
                options[key] = value
    return options


def test_slurm_multi_node_asks_for_one_task_per_node_and_a_signal_the_steps_get():
    script = EXAMPLES / "slurm-multi-node.sbatch"
    options = _sbatch_options(script)
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8"
    assert "--requeue" in options
    # Without "B:" SLURM signals the job steps, i.e. ftlaunch under srun on every node; "B:"
    # would signal only the batch shell, which cannot pass SIGTERM on through srun.
    what, _, lead = options["--signal"].partition("@")
    assert what in ("TERM", "SIGTERM", "15")
    params = train_params(_ftlaunch_line(script))
    assert int(lead) > grace_s(params)
    assert all(params[key] is None for key in MULTI_NODE_FLAGS)  # SLURM's variables say it


def _sbatch(tmp_path: Path, srun_code: int, restarts: int = 0) -> tuple[int, list[str], list[str]]:
    """Run slurm-multi-node.sbatch with stand-in srun (exits `srun_code`) and scontrol."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    srun_log, scontrol_log = tmp_path / "srun", tmp_path / "scontrol"
    _stand_in(bin_dir / "srun", f'printf "%s\\n" "$@" > {srun_log}\nexit {srun_code}\n')
    _stand_in(bin_dir / "scontrol", f'echo "$*" >> {scontrol_log}\n')
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(restarts)}
    proc = subprocess.run(["bash", str(EXAMPLES / "slurm-multi-node.sbatch")], env=env,
                          capture_output=True, text=True, timeout=60)
    requeues = scontrol_log.read_text().splitlines() if scontrol_log.exists() else []
    return proc.returncode, srun_log.read_text().splitlines(), requeues


def test_slurm_multi_node_starts_one_ftlaunch_per_node_with_the_environment_s_nodes(tmp_path):
    code, srun_args, _ = _sbatch(tmp_path, 0)
    assert code == 0
    launcher = srun_args.index("ftlaunch")
    srun_options = srun_args[:launcher]
    assert "--ntasks-per-node=1" in srun_options
    # One node exiting first (75 too) must not get SLURM to kill the others mid-checkpoint.
    assert "--kill-on-bad-exit=0" in srun_options
    params = train_params(srun_args[launcher + 1:])
    assert all(params[key] is None for key in MULTI_NODE_FLAGS)


@pytest.mark.parametrize("srun_code, restarts, requeued", [
    (75, 0, True), (143, 0, True), (137, 3, True),  # resumable: back into the queue
    (0, 0, False), (1, 0, False), (2, 0, False),    # done, failed, user error: stay out
    (75, 20, False),                                # resumable, but restarted often enough
])
def test_slurm_multi_node_requeues_itself_only_when_a_rerun_resumes(tmp_path, srun_code, restarts,
                                                                      requeued):
    code, _, requeues = _sbatch(tmp_path, srun_code, restarts)
    assert code == srun_code
    assert requeues == (["requeue 4242"] if requeued else [])


def test_pytorchjob_runs_the_same_ftlaunch_in_every_pod_and_gives_it_its_grace():
    (job,) = yaml.safe_load_all((EXAMPLES / "k8s-pytorchjob.yaml").read_text())
    assert job["apiVersion"].startswith("kubeflow.org/") and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    commands = []
    for replica in replicas.values():
        # ExitCode takes 1-127 as permanent: a preemption (75) would fail the job.
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        # The operator sets MASTER_PORT from this port of the container named "pytorch".
        assert container["name"] == "pytorch"
        assert "pytorchjob-port" in [port["name"] for port in container["ports"]]
        command = container["command"]
        assert isinstance(command, list) and command[0] == "ftlaunch"  # exec form: PID 1
        params = train_params(command[1:])
        # The operator's MASTER_ADDR / PET_NODE_RANK (or RANK) differ per pod; a flag would not.
        assert params["node_rank"] is None and params["master_addr"] is None
        assert pod["terminationGracePeriodSeconds"] > grace_s(params)
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert params["output_dir"].startswith("/runs/")
        assert "persistentVolumeClaim" in volumes[mounts["/runs"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        commands.append(command)
    assert commands[0] == commands[1]


FAKE_FTLAUNCH = """rank=; previous=
for arg in "$@"; do [ "$previous" = --node-rank ] && rank=$arg; previous=$arg; done
if [ -n "${FAKE_WAIT:-}" ]; then
  trap 'echo TERM >> "$FAKE_DIR/node-$rank.signals"; exit 75' TERM
  printf '%s\\n' "$@" > "$FAKE_DIR/node-$rank.args"
  for _ in $(seq 300); do sleep 0.1; done
  exit 9
fi
printf '%s\\n' "$@" > "$FAKE_DIR/node-$rank.args"
code=FAKE_CODE_$rank
exit "${!code}"
"""

# ssh's options, then the host, then the remote command, which runs here (as the remote
# shell would run it there); each call is logged as one line, "host<TAB>command".
FAKE_SSH = """while [ "${1:0:1}" = - ]; do case $1 in -o) shift 2 ;; *) shift ;; esac; done
host=$1; shift
command=$*
printf '%s\\t%s\\n' "$host" "${command//$'\\n'/ }" >> "$FAKE_DIR/ssh.log"
exec bash -c "$command"
"""


def _two_nodes_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir, workdir = tmp_path / "bin", tmp_path / "work"
    _stand_in(bin_dir / "ssh", FAKE_SSH)
    _stand_in(workdir / ".venv" / "bin" / "ftlaunch", FAKE_FTLAUNCH)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
            "HOSTS": "node-a node-b", "PORT": "29555", "WORKDIR": str(workdir),
            "PID_DIR": str(tmp_path), "RUN_DIR": str(tmp_path / "run"), **extra}


def _two_nodes(tmp_path: Path, codes: tuple[int, int]) -> int:
    env = _two_nodes_env(tmp_path, FAKE_CODE_0=str(codes[0]), FAKE_CODE_1=str(codes[1]))
    proc = subprocess.run(["bash", str(EXAMPLES / "ssh-two-nodes.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode


def _node_args(tmp_path: Path, rank: int) -> list[str]:
    return (tmp_path / f"node-{rank}.args").read_text().splitlines()


def test_ssh_script_is_valid_shell():
    subprocess.run(["bash", "-n", str(EXAMPLES / "ssh-two-nodes.sh")], check=True)


def test_ssh_script_runs_the_same_command_on_both_hosts_but_the_node_rank(tmp_path):
    assert _two_nodes(tmp_path, (0, 0)) == 0
    ranks = {}  # which host got which --node-rank: node 0 is the first of HOSTS
    for line in (tmp_path / "ssh.log").read_text().splitlines():
        host, command = line.split("\t")
        words = shlex.split(command)
        ranks[host] = words[words.index("--node-rank") + 1]
    assert ranks == {"node-a": "0", "node-b": "1"}
    commands = []
    for rank in (0, 1):
        args = _node_args(tmp_path, rank)
        at = args.index("--node-rank")
        assert args[at + 1] == str(rank)
        commands.append(args[:at] + args[at + 2:])
        params = train_params(args)
        assert params["nnodes"] == 2 and params["master_addr"] == "node-a"
        assert params["master_port"] == 29555 and params["output_dir"] == str(tmp_path / "run")
        assert grace_s(params) > 0
    assert commands[0] == commands[1]


@pytest.mark.parametrize("codes, expected", [
    ((0, 1), 1), ((1, 0), 1),    # either node failing fails the whole run
    ((75, 75), 75),              # preempted everywhere: resumable
    ((75, 143), 143), ((2, 2), 2),
])
def test_ssh_script_exit_code_reflects_every_node(tmp_path, codes, expected):
    assert _two_nodes(tmp_path, codes) == expected


def test_ssh_script_passes_sigterm_on_to_ftlaunch_on_every_host(tmp_path):
    env = _two_nodes_env(tmp_path, FAKE_WAIT="1")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "ssh-two-nodes.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"node-{rank}.args").exists() for rank in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Both stand-ins got SIGTERM and "checkpointed" (exit 75); the script waited for them.
    assert proc.returncode == 75, output
    for rank in (0, 1):
        assert (tmp_path / f"node-{rank}.signals").read_text().split() == ["TERM"]
    kills = [line for line in (tmp_path / "ssh.log").read_text().splitlines() if "kill" in line]
    assert sorted(line.split("\t")[0] for line in kills) == ["node-a", "node-b"]
