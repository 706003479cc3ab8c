"""A bad-input matrix for the real `ftlaunch` console script.

Every case is a command a user might plausibly type wrong. Each one must end with exit
code 2 and a single one-paragraph `ftlaunch: error:` message that names the problem
(the flag, file or value) and the fix, with no traceback, and must leave an existing run
directory exactly as it was: `existing_run`, a copy of the session's finished tiny run,
is the --output-dir of every case that takes one (unless the case is about another
directory) and is compared file by file (size, sha256, mtime) before and after. Nothing
may appear beside it (no `run.old-*`), and the case's own tmp_path (its cwd, holding its
data and recipe files) must not change either.

Any command that is *not* refused for the intended reason would usually still stop at
`existing_run` with "holds a run made with different settings" (also exit 2), so each
case's needles are specific to its own error and that message is forbidden unless the
case is about it.

Each case runs the installed script as a subprocess, offline, with a cache of this
module's own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import pytest

from conftest import (FTLAUNCH, TINY_TRAIN, cores, error_report, in_tmpfs, tree,
                      user_error_problems)

WRONG_REASON = "holds a run made with different settings"
TIMEOUT_S = 300

# A needle: a substring, a compiled regex, or a tuple of alternatives (any one will do).
# Strings may hold {tmp} (the case's tmp_path) and {run} (the existing run directory).
Needle = Union[str, "re.Pattern[str]", tuple]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (tmp_path, existing_run) -> ftlaunch argv
    needles: tuple[Needle, ...]  # all must be in the error message
    forbidden: tuple[str, ...] = (WRONG_REASON,)  # none may be in stderr
    skip: Callable[[], str | None] | None = None  # a reason to skip here, or None


# --- helpers ------------------------------------------------------------------------------

def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _fill(text: str, tmp: Path, run: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{run}", str(run))


def _filled(needle, tmp: Path, run: Path):
    if isinstance(needle, tuple):
        return tuple(_filled(n, tmp, run) for n in needle)
    return _fill(needle, tmp, run) if isinstance(needle, str) else needle


def _tree_diff(before: dict, after: dict) -> list[str]:
    lines = [f"  appeared: {p}" for p in sorted(set(after) - set(before))]
    lines += [f"  vanished: {p}" for p in sorted(set(before) - set(after))]
    lines += [f"  changed:  {p} {before[p]} -> {after[p]}"
              for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return lines


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def existing_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the session's finished tiny run (TINY_TRAIN), made once for this module;
    every case checks it is left exactly as it was."""
    run = tmp_path_factory.mktemp("existing") / "run"
    shutil.copytree(tiny_run[1], run, symlinks=True)
    return run


def check_case(argv: list[str], needles, forbidden, tmp: Path, run: Path, env: dict,
               expected_new_in_tmp: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run argv (a full command line) with cwd tmp; assert a clean user error and that
    neither `run` (nor anything beside it) nor tmp changed."""
    run_before, tmp_before = tree(run), tree(tmp)
    result = subprocess.run([str(a) for a in argv], env=env, cwd=tmp, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    problems = user_error_problems(result, [_filled(n, tmp, run) for n in needles],
                                   [_fill(f, tmp, run) for f in forbidden])
    changed = _tree_diff(run_before, tree(run))
    if changed:
        problems.append(f"the existing run {run} changed:\n" + "\n".join(changed))
    siblings = sorted(p.name for p in run.parent.iterdir())
    if siblings != [run.name]:
        problems.append(f"beside the existing run: {siblings} (something was moved aside)")
    tmp_after = tree(tmp)
    for name in expected_new_in_tmp:
        tmp_after.pop(name, None)
    if expected_new_in_tmp and "." in tmp_before:  # those files changed tmp's own mtime
        tmp_after["."] = tmp_before["."]
    changed = _tree_diff(tmp_before, tmp_after)
    if changed:
        problems.append(f"the working directory {tmp} changed:\n" + "\n".join(changed))
    if problems:
        pytest.fail(error_report(problems, result), pytrace=False)
    return result


# --- the cases ----------------------------------------------------------------------------

def _tiny(run: Path, *extra: str) -> list[str]:
    """`--model tiny ... --dry-run --output-dir RUN`: a plan, no training."""
    return ["--model", "tiny", *extra, "--dry-run", "--output-dir", str(run)]


def _with_data(name: str, content: str | bytes, *extra: str):
    def setup(tmp: Path, run: Path) -> list[str]:
        return _tiny(run, "--data", str(_write(tmp / name, content)), *extra)
    return setup


_TEXT_ROWS = "".join(f'{{"text": "example number {i}"}}\n' for i in range(20))
_NO_ASSISTANT = ('{"messages": [{"role": "user", "content": "hi"}]}\n'
                 '{"messages": [{"role": "system", "content": "be brief"}, '
                 '{"role": "user", "content": "yo"}]}\n')


def _empty_data_dir(tmp: Path, run: Path) -> list[str]:
    (tmp / "emptydir").mkdir()
    return _tiny(run, "--data", str(tmp / "emptydir"))


def _eval_split_and_eval_data(tmp: Path, run: Path) -> list[str]:
    train = _write(tmp / "train.jsonl", _TEXT_ROWS)
    held = _write(tmp / "eval.jsonl", '{"text": "held out one"}\n{"text": "held out two"}\n')
    return _tiny(run, "--data", str(train), "--eval-data", str(held), "--eval-split", "0.1")


def _recipe(name: str, text: str):
    def setup(tmp: Path, run: Path) -> list[str]:
        return _tiny(run, "--recipe", str(_write(tmp / name, text)))
    return setup


def _output_dir_is_file(tmp: Path, run: Path) -> list[str]:
    _write(tmp / "afile", "not a directory\n")
    return ["--model", "tiny", "--dry-run", "--output-dir", str(tmp / "afile")]


def _output_dir_under_file(tmp: Path, run: Path) -> list[str]:
    _write(tmp / "afile", "not a directory\n")
    return ["--model", "tiny", "--dry-run", "--output-dir", str(tmp / "afile" / "run")]


def _output_dir_read_only(tmp: Path, run: Path) -> list[str]:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ["--model", "tiny", "--dry-run", "--output-dir", str(locked / "run")]


def _not_a_run(*extra: str):
    def setup(tmp: Path, run: Path) -> list[str]:
        _write(tmp / "my-thesis" / "chapter1.txt", "do not touch\n")
        return ["--model", "tiny", *extra, "--output-dir", str(tmp / "my-thesis")]
    return setup


def _changed_settings(tmp: Path, run: Path) -> list[str]:
    args = list(TINY_TRAIN)
    args[args.index("--seq-len") + 1] = "64"  # the run was made with 128
    return [*args, "--dry-run", "--output-dir", str(run)]


def _stopped_run(tmp: Path, run: Path) -> Path:
    """A copy of the existing run as a run stopped before the end looks: no adapter/."""
    stopped = tmp / "stopped"
    shutil.copytree(run, stopped, symlinks=True)
    shutil.rmtree(stopped / "adapter")
    return stopped


def _half_merged(tmp: Path, run: Path) -> list[str]:
    out = tmp / "half-merged"
    _write(out / "config.json", '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}\n')
    _write(out / "model.safetensors", os.urandom(777))  # cut short
    return ["merge", str(run), "--out", str(out)]


def _plain_dir(name: str, command: list[str], *after: str):
    def setup(tmp: Path, run: Path) -> list[str]:
        _write(tmp / name / "notes.txt", "not a run\n")
        return [*command, str(tmp / name), *after]
    return setup


def _not_root() -> str | None:
    return "root ignores directory permissions" if os.geteuid() == 0 else None


def _needs_no_package(*names: str):
    def skip() -> str | None:
        found = [n for n in names if importlib.util.find_spec(n) is not None]
        return f"{', '.join(found)} is installed here" if found else None
    return skip


SECRET = "hf_SECRETvalue123"

CASES = [
    # 1-2: the model
    Case("model-typo-of-a-preset",
         lambda t, r: ["--model", "lama-3.1-8b", "--dry-run", "--output-dir", str(r)],
         # the typed name, not only as the tail of the suggested llama-3.1-8b
         (re.compile(r"(?<![lL])lama-3\.1-8b"), "Did you mean", "llama-3.1-8b")),
    Case("model-unknown-with-train-word",
         lambda t, r: ["train", "--model", "nosuchmodel", "--dry-run", "--output-dir", str(r)],
         ("nosuchmodel", "`ftlaunch recipes`")),
    # 3-4: --hardware
    Case("hardware-banana", lambda t, r: ["plan", "--model", "tiny", "--hardware", "banana"],
         ("banana", "8xH100-80GB")),
    Case("hardware-without-memory", lambda t, r: ["plan", "--model", "tiny", "--hardware", "2xH100"],
         ("2xH100", "memory", "2xH100-80GB")),
    Case("hardware-zero-gpus", lambda t, r: ["plan", "--model", "tiny", "--hardware", "0xA100-80GB"],
         ("0xA100-80GB", "at least 1")),
    Case("hardware-on-a-real-start",
         lambda t, r: ["--model", "tiny", "--hardware", "1xA100-80GB", "--output-dir", str(r)],
         ("--hardware 1xA100-80GB", "--dry-run")),
    # 5: --gpus
    Case("gpus-more-than-here", lambda t, r: _tiny(r, "--gpus", "99"),
         ("--gpus 99", "at most --gpus")),
    Case("gpus-zero", lambda t, r: _tiny(r, "--gpus", "0"), ("--gpus 0", "--gpus auto")),
    Case("gpus-not-a-number", lambda t, r: _tiny(r, "--gpus", "two"),
         ("two", "whole number")),
    # 6: numbers that must be positive
    Case("max-steps-zero", lambda t, r: _tiny(r, "--max-steps", "0"),
         ("--max-steps 0", "at least 1")),
    Case("max-steps-negative", lambda t, r: _tiny(r, "--max-steps", "-5"),
         ("--max-steps -5", "at least 1")),
    Case("epochs-zero", lambda t, r: _tiny(r, "--epochs", "0"), ("--epochs 0", "positive")),
    Case("global-batch-size-zero", lambda t, r: _tiny(r, "--global-batch-size", "0"),
         ("--global-batch-size", "at least 1")),
    Case("seq-len-zero", lambda t, r: _tiny(r, "--seq-len", "0"), ("--seq-len", "at least 1")),
    Case("global-batch-size-indivisible",
         lambda t, r: _tiny(r, "--gpus", "2", "--global-batch-size", "3"),
         ("--global-batch-size 3", "2 processes", "--global-batch-size 2 or --global-batch-size 4"),
         skip=lambda: None if cores() >= 2 else "--gpus 2 on a CPU-only box needs two cores"),
    # 7: longer than the model's context (tiny: max_position_embeddings 1024)
    Case("seq-len-beyond-context", lambda t, r: _tiny(r, "--seq-len", "100000"),
         ("--seq-len 100000", "1024")),
    # 8: --set
    Case("set-unknown-key", lambda t, r: _tiny(r, "--set", "learning_rat=1"),
         (re.compile(r"learning_rat(?!e)"), "Did you mean learning_rate")),
    Case("set-wrong-type-float", lambda t, r: _tiny(r, "--set", "learning_rate=abc"),
         ("learning_rate", "abc", "expected float")),
    Case("set-wrong-type-lora-int", lambda t, r: _tiny(r, "--set", "lora.r=abc"),
         ("lora.r", "abc", "expected int")),
    # values of the right type but out of range: refused by the launcher, not by a worker
    # after model loading (the libraries accept most of them)
    Case("set-lora-rank-zero", lambda t, r: _tiny(r, "--set", "lora.r=0"),
         ("lora.r=0", "at least 1")),
    Case("set-learning-rate-negative", lambda t, r: _tiny(r, "--set", "learning_rate=-1e-4"),
         ("learning_rate=-1e-4", "greater than 0")),
    Case("set-learning-rate-nan", lambda t, r: _tiny(r, "--set", "learning_rate=nan"),
         ("learning_rate=nan", "finite", "greater than 0")),
    Case("set-lora-dropout-above-one", lambda t, r: _tiny(r, "--set", "lora.lora_dropout=1.5"),
         ("lora.lora_dropout=1.5", "from 0 up to (not including) 1")),
    Case("set-scheduler-unknown", lambda t, r: _tiny(r, "--set", "lr_scheduler_type=cosyne"),
         ("lr_scheduler_type='cosyne'", "SFTConfig", "cosine")),  # TRL's own check
    Case("recipe-lora-rank-zero", _recipe("rank0.yaml", "method: lora\nlora:\n  r: 0\n"),
         ("{tmp}/rank0.yaml", "r=0", "at least 1")),
    Case("set-malformed", lambda t, r: _tiny(r, "--set", "foo"), ("foo", "KEY=VALUE")),
    Case("set-plan-owned-key", lambda t, r: _tiny(r, "--set", "max_length=5"),
         ("max_length", "--seq-len")),
    Case("set-secret-on-command-line", lambda t, r: _tiny(r, "--set", f"hub_token={SECRET}"),
         ("hub_token", "environment"), forbidden=(WRONG_REASON, SECRET)),
    # 9: --data
    Case("data-missing-file", lambda t, r: _tiny(r, "--data", str(t / "missing.jsonl")),
         ("--data {tmp}/missing.jsonl", "no such file", "ftlaunch reads .jsonl")),
    Case("data-empty-file", _with_data("empty.jsonl", ""),
         ("{tmp}/empty.jsonl", "no examples",
          "one example per line", "another --data")),
    Case("data-binary-file", _with_data("blob.jsonl", os.urandom(4096)),
         ("{tmp}/blob.jsonl", "UTF-8",
          "save it as UTF-8", "another --data")),
    Case("data-bad-json-line-3",
         _with_data("bad.jsonl", '{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n'),
         ("{tmp}/bad.jsonl", "line 3", "not valid JSON")),
    Case("data-line-not-an-object", _with_data("list.jsonl", '{"text": "fine"}\n[1, 2]\n'),
         ("{tmp}/list.jsonl", "line 2", "JSON object")),
    Case("data-unknown-format-keys",
         _with_data("odd.jsonl", '{"quux_question": "a", "quux_answer": "b"}\n' * 3),
         ("{tmp}/odd.jsonl", "quux_question", "--set data.format=")),
    Case("data-nothing-to-train-on", _with_data("noasst.jsonl", _NO_ASSISTANT),
         ("{tmp}/noasst.jsonl", "nothing to train on", "--set data.format")),
    Case("data-empty-folder", _empty_data_dir,
         ("{tmp}/emptydir", "no .jsonl, .json, .csv or .parquet files", "save_to_disk")),
    Case("data-txt-file", _with_data("notes.txt", "hello world\nsecond line\n"),
         ("{tmp}/notes.txt", ".txt", "ftlaunch reads .jsonl")),
    Case("data-xml-file", _with_data("notes.xml", "<a><b>hello</b></a>\n"),
         ("{tmp}/notes.xml", ".xml", "ftlaunch reads .jsonl")),
    # 10: evaluation data
    Case("eval-split-above-one", lambda t, r: _tiny(r, "--eval-split", "1.5"),
         ("--eval-split 1.5", "between 0 and 1")),
    Case("eval-split-leaves-nothing-to-train", lambda t, r: _tiny(r, "--eval-split", "0.999"),
         ("--eval-split 0.999", "leaves 0 for training", "one global batch", "--eval-data")),
    Case("eval-split-and-eval-data", _eval_split_and_eval_data,
         ("--eval-split", "--eval-data", "not both")),
    Case("eval-data-missing-file", lambda t, r: _tiny(r, "--eval-data", str(t / "nope.jsonl")),
         ("--eval-data {tmp}/nope.jsonl", "no such file")),
    # 11: recipe files
    Case("recipe-typo-in-training-key",
         _recipe("typo.yaml", "method: lora\ntraining:\n  learnin_rate: 1.0e-4\n"),
         ("{tmp}/typo.yaml", "learnin_rate", "learning_rate"),
         forbidden=(WRONG_REASON, "--set learnin_rate")),  # no --set was given
    Case("recipe-typo-in-top-level-key", _recipe("top.yaml", "methd: lora\n"),
         ("{tmp}/top.yaml", "methd", "method")),
    Case("recipe-missing-file", lambda t, r: _tiny(r, "--recipe", str(t / "missing.yaml")),
         ("{tmp}/missing.yaml", "bundled recipe")),
    Case("recipe-not-yaml", _recipe("broken.yaml", "method: lora\ntraining: [unclosed\n  x: : :\n"),
         ("{tmp}/broken.yaml", "YAML", "line 3")),
    Case("recipe-top-level-list", _recipe("list.yaml", "- lora\n- qlora\n"),
         ("{tmp}/list.yaml", "mapping")),
    # 12: output directories that cannot be a run
    Case("output-dir-is-a-file", _output_dir_is_file,
         ("{tmp}/afile", "is a file", "another --output-dir")),
    Case("output-dir-under-a-file", _output_dir_under_file,
         ("{tmp}/afile/run", "is a file", "another --output-dir")),
    Case("output-dir-read-only", _output_dir_read_only,
         ("{tmp}/locked", "not writable", "another --output-dir"), skip=_not_root),
    Case("output-dir-not-a-run", _not_a_run("--dry-run"),
         ("{tmp}/my-thesis", "not an ftlaunch run", "empty or new directory")),
    Case("output-dir-not-a-run-fresh", _not_a_run("--fresh"),
         ("{tmp}/my-thesis", "not an ftlaunch run", "empty or new directory")),
    # 13: another run's directory, with a different command
    Case("output-dir-holds-a-different-run", _changed_settings,
         (WRONG_REASON, "seq_len: was 128, now 64", "--fresh"), forbidden=()),
    # 16: a model that fits nowhere here, and what would
    Case("plan-does-not-fit",
         lambda t, r: ["--model", "llama-3.1-70b", "--hardware", "1xRTX4090-24GB", "--method",
                       "lora", "--dry-run", "--output-dir", str(r)],
         ("does not fit", "would fit")),
    # 17-18: flags that contradict each other
    # (--engine fsdp / deepspeed on one process run that engine: its checkpoints.)
    Case("engine-ddp-on-one-process",
         lambda t, r: _tiny(r, "--method", "lora", "--engine", "ddp", "--gpus", "1"),
         ("--engine ddp", "--gpus")),
    Case("random-init-with-qlora", lambda t, r: _tiny(r, "--random-init", "--method", "qlora"),
         ("--random-init", "--method lora")),
    # 19: durations
    Case("grace-not-a-duration", lambda t, r: _tiny(r, "--grace", "soon"),
         ("--grace", "soon", "30m")),
    Case("save-every-zero", lambda t, r: _tiny(r, "--save-every", "0"),
         ("--save-every", "longer than zero")),
    Case("stall-timeout-not-a-duration", lambda t, r: _tiny(r, "--stall-timeout", "never-ish"),
         ("--stall-timeout", "never-ish", "30m")),
    # 20: experiment trackers
    Case("report-to-tensorboard-not-installed", lambda t, r: _tiny(r, "--report-to", "tensorboard"),
         ("--report-to tensorboard", "pip install tensorboard"),
         skip=_needs_no_package("tensorboard", "tensorboardX")),
    Case("report-to-unknown-tracker", lambda t, r: _tiny(r, "--report-to", "nosuchtracker"),
         ("nosuchtracker", "use one of")),
    # 21-23: merge, resume and generate of what is not a finished run
    Case("merge-run-without-adapter", lambda t, r: ["merge", str(_stopped_run(t, r))],
         ("{tmp}/stopped", "no finished adapter", "resume the training")),
    Case("merge-not-a-run", _plain_dir("my-notes", ["merge"]),
         ("{tmp}/my-notes", ("not an ftlaunch run", "no run.yaml"), "finished training")),
    Case("merge-into-an-interrupted-merge", _half_merged,
         ("{tmp}/half-merged", "interrupted", ("remove that folder", "another --out"))),
    Case("resume-not-a-run", _plain_dir("somewhere", ["resume"]),
         ("{tmp}/somewhere", "not an ftlaunch run directory", "--output-dir")),
    Case("generate-run-without-adapter",
         lambda t, r: ["generate", str(_stopped_run(t, r)), "--prompt", "hi"],
         ("{tmp}/stopped", "no finished adapter", "resume the training")),
    # 24: multi-node flags
    Case("node-rank-not-below-nnodes", lambda t, r: _tiny(r, "--nnodes", "2", "--node-rank", "2"),
         ("--node-rank 2", "--nnodes 2")),
    Case("nnodes-zero", lambda t, r: _tiny(r, "--nnodes", "0"), ("--nnodes 0", "at least 1")),
    Case("master-port-out-of-range", lambda t, r: _tiny(r, "--master-port", "70000"),
         ("--master-port 70000", "65535")),
    # Beyond the list: click's own refusals (a bad choice, a misspelt flag) in the same form.
    Case("method-not-a-choice", lambda t, r: _tiny(r, "--method", "lorra"),
         ("lorra", "qlora")),
    Case("flag-misspelt", lambda t, r: _tiny(r, "--max-step", "5"),
         (re.compile(r"--max-step(?!s)"), "--max-steps")),
]

assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path, existing_run, cli_env):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    argv = case.setup(tmp_path, existing_run)
    check_case([FTLAUNCH, *argv], case.needles, case.forbidden, tmp_path, existing_run,
               cli_env)


# --- cases that need more than files ----------------------------------------------------------

@pytest.mark.skipif(cores() < 2, reason="--gpus 2 on a CPU-only box needs two cores")
def test_master_port_in_use(tmp_path, existing_run, cli_env):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        check_case([FTLAUNCH, *_tiny(existing_run, "--gpus", "2", "--master-port", str(port))],
                   (f"--master-port {port}", "in use",
                    ("free port", "leave --master-port out")),
                   (WRONG_REASON,), tmp_path, existing_run, cli_env)


def test_not_enough_disk(tmpfs_allowed, tmp_path, existing_run, cli_env):
    """The output directory on a real 1 MiB filesystem (a tmpfs in a private mount
    namespace): refused for disk space, and nothing written there."""
    quota = tmp_path / "quota"
    quota.mkdir()
    left = tmp_path / "left.txt"
    argv = ["sh", "-c", f'"$@"; code=$?; ls -A {quota} > {left}; exit $code', "sh",
            FTLAUNCH, "--model", "tiny", "--max-steps", "2", "--seq-len", "64", "--dry-run",
            "--output-dir", str(quota / "run")]
    result = check_case(in_tmpfs(quota, "1m", argv),
                        ("Not enough free disk", "{tmp}/quota/run",
                         ("another --output-dir", "free space")),
                        (WRONG_REASON,), tmp_path, existing_run, cli_env,
                        expected_new_in_tmp=("left.txt",))
    assert result.returncode != 97, "the tmpfs could not be mounted"
    assert left.read_text() == "", f"written on the full disk: {left.read_text()!r}"


def test_read_only_filesystem(tmpfs_allowed, tmp_path, existing_run, cli_env):
    """The output directory on a real read-only filesystem (a tmpfs mounted ro in a private
    mount namespace): what the chmod case checks, also where root cannot write."""
    mount = tmp_path / "readonly"
    mount.mkdir()
    argv = ["--model", "tiny", "--dry-run", "--output-dir", str(mount / "run")]
    result = check_case(in_tmpfs(mount, "256m,ro", [FTLAUNCH, *argv]),
                        ("{tmp}/readonly/run", "not writable", "another --output-dir"),
                        (WRONG_REASON,), tmp_path, existing_run, cli_env)
    assert result.returncode != 97, "the tmpfs could not be mounted"
