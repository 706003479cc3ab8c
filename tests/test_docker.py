"""docker/: what the Dockerfile promises, checked by reading it (a pinned base, torch and
every library at the constraints.txt versions, a non-root user, volumes for runs and
caches, ftlaunch as PID 1, COPY sources that reach the build context), that the commands
in docker/README.md build that file and pass ftlaunch real flags, and, where they are
installed, BuildKit's linter (`docker build --check`) and hadolint.

Set FTLAUNCH_DOCKER_BUILD=1 on a machine with a docker daemon that reaches Docker Hub
and PyPI to also build the image and run it (slow: gigabytes of CUDA libraries)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click
import pytest

from conftest import grace_s, parse_ftlaunch

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
README = ROOT / "docker" / "README.md"


# --- reading a Dockerfile ------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the (joined) line
    line: int  # where it starts in the file


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions as Docker reads them: a trailing backslash continues the line, and
    comment or blank lines inside a continuation are dropped."""
    assert not re.match(r"#\s*escape\s*=", text), "an escape directive: this parser assumes '\\'"
    instructions, parts, start = [], [], None
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if start is None:
            start = number
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        keyword, _, args = "".join(parts).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts, start = [], None
    assert not parts, f"line {start}: the file ends inside a continued line"
    return instructions


def expand(text: str, variables: dict[str, str]) -> str:
    """$NAME and ${NAME} from ARG/ENV values seen so far; unknown names are left."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def key_values(args: str) -> dict[str, str]:
    """ENV/ARG arguments: KEY=VALUE ... (or the legacy `ENV KEY VALUE`, or a bare ARG)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def leading_flags(args: str) -> tuple[dict[str, str], str]:
    """COPY --chown=1000 a b -> ({'chown': '1000'}, 'a b')."""
    flags = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        args = args.lstrip()
    return flags, args


def words_or_json(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


def within(path: str, parent: str) -> bool:
    p, q = PurePosixPath(path), PurePosixPath(parent)
    return p == q or q in p.parents


class Dockerfile:
    def __init__(self, path: Path):
        self.instructions = parse_dockerfile(path.read_text())
        froms = [i for i, ins in enumerate(self.instructions) if ins.keyword == "FROM"]
        assert froms, "no FROM"
        self.final_from = froms[-1]
        # The ARG/ENV values and the working directory each instruction sees; ARGs
        # before the first FROM are visible to every FROM.
        self.variables: list[dict[str, str]] = []
        self.workdirs: list[str] = []
        global_args: dict[str, str] = {}
        variables: dict[str, str] = {}
        workdir = "/"
        for index, ins in enumerate(self.instructions):
            if ins.keyword == "FROM":
                variables, workdir = dict(global_args), "/"
            self.variables.append(dict(variables))
            self.workdirs.append(workdir)
            if ins.keyword in ("ARG", "ENV"):
                values = {k: expand(v, variables) for k, v in key_values(ins.args).items()}
                variables.update(values)
                if index < froms[0]:
                    global_args.update(values)
            elif ins.keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / expand(ins.args, variables))
        self.final_variables = variables
        self.final_workdir = workdir

    def final(self, keyword: str) -> list[tuple[int, Instruction]]:
        """(index, instruction) of `keyword` in the last stage, the image that ships."""
        return [(i, ins) for i, ins in enumerate(self.instructions)
                if i > self.final_from and ins.keyword == keyword]

    def all(self, keyword: str) -> list[tuple[int, Instruction]]:
        return [(i, ins) for i, ins in enumerate(self.instructions) if ins.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The image's environment (ENV and ARG values of the last stage, expanded)."""
        return dict(self.final_variables)

    def volumes(self) -> list[str]:
        return [expand(v, self.variables[i]) for i, ins in self.final("VOLUME")
                for v in words_or_json(ins.args)]

    def final_user(self) -> tuple[int, str]:
        users = self.final("USER")
        assert users, "no USER instruction: the image runs as root"
        index, ins = users[-1]
        return index, expand(ins.args, self.variables[index])


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- shell commands inside RUN -------------------------------------------------------

def shell_commands(script: str) -> list[list[str]]:
    """A RUN's shell script split into simple commands (at &&, ||, ;, |), quotes kept
    intact: `a && b "x; y"` -> [['a'], ['b', 'x; y']]."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


@dataclass
class PipInstall:
    index: int  # the RUN's instruction index
    env: dict[str, str]  # VAR=value prefixes
    options: list[tuple[str, str | None]]
    requirements: list[str]
    workdir: str


_PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                      "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix",
                      "--root", "--platform", "--python-version", "--implementation", "--abi",
                      "--upgrade-strategy", "--progress-bar", "--cache-dir", "--src", "--log",
                      "--report", "--config-settings", "-C", "--trusted-host", "--timeout"}


def pip_installs(dockerfile: Dockerfile) -> list[PipInstall]:
    found = []
    for index, ins in dockerfile.all("RUN"):
        _, script = leading_flags(ins.args)
        for words in shell_commands(script):
            env = {}
            while words and re.fullmatch(r"\w+=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            rest = _after_pip_install(words)
            if rest is None:
                continue
            options, requirements = [], []
            it = iter(rest)
            for word in it:
                if word.startswith("-"):
                    name, eq, value = word.partition("=")
                    if eq:
                        options.append((name, value))
                    elif name in _PIP_VALUE_OPTIONS:
                        options.append((name, next(it, None)))
                    elif name in ("-e", "--editable"):
                        requirements.append(next(it, ""))
                    else:
                        options.append((name, None))
                elif word.startswith(">") or word.isdigit():
                    break  # a redirection
                else:
                    requirements.append(word)
            found.append(PipInstall(index, env, options, requirements,
                                    dockerfile.workdirs[index]))
    return found


def _after_pip_install(words: list[str]) -> list[str] | None:
    for i, word in enumerate(words):
        if (word in ("pip", "pip3") or word.endswith("/pip")) and words[i + 1:i + 2] == ["install"]:
            return words[i + 2:]
        if word == "-m" and words[i + 1:i + 3] == ["pip", "install"]:
            return words[i + 3:]
    return None


def requirement(spec: str) -> tuple[str | None, set[str], str | None]:
    """'trl==1.16.0' -> ('trl', set(), '1.16.0'); '.[deepspeed]' -> (None, {'deepspeed'}, None):
    a local path (the project) has no name."""
    if spec.startswith((".", "/")):
        extras = re.search(r"\[([^\]]*)\]$", spec)
        return None, set(extras.group(1).split(",")) if extras else set(), None
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?\s*(.*)", spec)
    assert m, f"cannot read the requirement {spec!r}"
    version = m.group(3)[2:].strip() if m.group(3).startswith("==") else None
    return canonical(m.group(1)), set(filter(None, (m.group(2) or "").split(","))), version


def copy_destinations(dockerfile: Dockerfile) -> dict[str, str]:
    """Where each COPY puts each repository file or folder: container path -> repo path."""
    placed = {}
    for index, ins in dockerfile.all("COPY") + dockerfile.all("ADD"):
        flags, args = leading_flags(ins.args)
        if "from" in flags:
            continue
        words = [expand(w, dockerfile.variables[index]) for w in words_or_json(args)]
        sources, dest = words[:-1], words[-1]
        target = PurePosixPath(dockerfile.workdirs[index]) / dest
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for source in sources:
            name = PurePosixPath(source.rstrip("/")).name
            placed[str(target / name if into_dir else target)] = source.rstrip("/")
    return placed


# --- .dockerignore -------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is an exception '!', regex) in file order; a Dockerfile-specific ignore file
    (docker/Dockerfile.dockerignore) replaces the root one, as BuildKit does."""
    specific = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    path = specific if specific.exists() else ROOT / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip()
        cleaned = str(PurePosixPath("/" + line)).lstrip("/") or "."
        patterns.append((negated, re.compile(_glob_regex(cleaned))))
    return patterns


def _glob_regex(pattern: str) -> str:
    """Docker's pattern syntax (Go's filepath.Match plus '**' for any number of folders)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            assert end > 0, f"unclosed [ in .dockerignore pattern {pattern!r}"
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out) + r"\Z"


def ignored(path: str, patterns) -> bool:
    """Whether the build context leaves `path` (relative to the root) out: the last
    pattern that matches it or one of its parent folders decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    result = False
    for negated, regex in patterns:
        if any(regex.match(c) for c in candidates):
            result = not negated
    return result


def tracked_files(folder: str) -> list[str]:
    """The repository's files under `folder` (git's list; every file if git cannot say)."""
    proc = subprocess.run(["git", "ls-files", "-z", "--", folder], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout:
        return [f for f in proc.stdout.split("\0") if f]
    return [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]


# --- the Dockerfile ------------------------------------------------------------------

def test_every_base_image_is_pinned(dockerfile):
    stages = set()
    for index, ins in dockerfile.all("FROM"):
        _, args = leading_flags(ins.args)
        words = expand(args, dockerfile.variables[index]).split()
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2].lower())
        if image.lower() in stages or image == "scratch":
            continue
        assert "$" not in image, f"line {ins.line}: FROM {image}: an unresolved variable"
        if "@sha256:" in image:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", \
            f"line {ins.line}: FROM {image} is not pinned: give an exact tag or a digest"


def test_runs_as_a_fixed_non_root_user_from_the_last_root_step_on(dockerfile):
    index, user = dockerfile.final_user()
    name = user.split(":")[0]
    assert name.isdigit() and int(name) != 0, (
        f"USER {user}: want a fixed non-zero UID (numeric, so Kubernetes' runAsNonRoot "
        "can verify it)")
    needs_root = re.compile(r"\b(apt-get|apt|apk|dnf|yum|useradd|usermod|userdel|groupadd|chown)\b"
                            r"|\bpip3? install\b|-m pip install\b")
    root_steps = [i for i, ins in dockerfile.final("RUN") if needs_root.search(ins.args)]
    assert root_steps and max(root_steps) < index, \
        "a RUN that needs root comes after the last USER (or there is none before it)"
    entrypoints = dockerfile.final("ENTRYPOINT")
    assert entrypoints and index < entrypoints[-1][0], "no ENTRYPOINT after the last USER"
    creates = [ins for i, ins in dockerfile.final("RUN")
               if i < index and re.search(rf"\buseradd\b[^&;|]*(?:--uid[ =]|-u ){name}\b",
                                          ins.args)]
    assert creates, f"no RUN creates the user with UID {name} (useradd --uid {name})"


def test_volumes_hold_the_runs_and_the_hf_cache_and_belong_to_the_user(dockerfile):
    volumes = dockerfile.volumes()
    env = dockerfile.env()
    assert "/runs" in volumes, f"VOLUME {volumes}: /runs (run directories) is not one"
    assert "HF_HOME" in env, "no ENV HF_HOME: the Hugging Face cache would be in $HOME"
    assert any(within(env["HF_HOME"], v) for v in volumes), \
        f"HF_HOME={env['HF_HOME']} is not inside a VOLUME ({volumes})"
    # A new named volume copies the image's folder, owner included: the user must own it.
    index, user = dockerfile.final_user()
    volume_index = dockerfile.final("VOLUME")[-1][0]
    owned = []
    for i, ins in dockerfile.final("RUN"):
        if i < volume_index:
            for words in shell_commands(ins.args):
                if words[0] == "chown":
                    args = [w for w in words[1:] if not w.startswith("-")]
                    if args and args[0].split(":")[0] == user.split(":")[0]:
                        owned += args[1:]
    for volume in volumes:
        assert any(within(volume, path) for path in owned), \
            f"VOLUME {volume} is not chown'd to USER {user} before the VOLUME instruction"


def test_entrypoint_is_ftlaunch_in_exec_form(dockerfile):
    entrypoints = dockerfile.final("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    _, ins = entrypoints[-1]
    assert ins.args.startswith("["), (
        f"ENTRYPOINT {ins.args}: shell form runs /bin/sh as PID 1, which does not pass "
        "SIGTERM on to ftlaunch; use the exec form [\"ftlaunch\"]")
    command = json.loads(ins.args)
    assert command and PurePosixPath(command[0]).name == "ftlaunch"
    for _, cmd in dockerfile.final("CMD"):
        assert cmd.args.startswith("["), "a shell-form CMD would reach ftlaunch as '/bin/sh -c ...'"
    for _, stop in dockerfile.final("STOPSIGNAL"):
        assert stop.args.upper() in ("SIGTERM", "SIGINT", "TERM", "INT", "15", "2"), \
            f"STOPSIGNAL {stop.args}: ftlaunch checkpoints on SIGTERM/SIGINT only"


def test_copy_sources_exist_and_reach_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = [(i, ins) for i, ins in dockerfile.all("COPY") + dockerfile.all("ADD")
              if "from" not in leading_flags(ins.args)[0]]
    assert copies
    for index, ins in copies:
        _, args = leading_flags(ins.args)
        words = [expand(w, dockerfile.variables[index]) for w in words_or_json(args)]
        for source in words[:-1]:
            assert "://" not in source, f"line {ins.line}: {source}: fetch nothing at build time"
            matches = sorted(ROOT.glob(source.rstrip("/"))) if any(c in source for c in "*?[") \
                else [ROOT / source]
            assert matches and all(m.exists() for m in matches), \
                f"line {ins.line}: COPY {source}: not in the repository (the build context is its root)"
            for match in matches:
                rel = match.relative_to(ROOT).as_posix()
                assert not ignored(rel, patterns), f"line {ins.line}: {rel} is in .dockerignore"
                if match.is_dir():
                    left_out = [f for f in tracked_files(rel) if ignored(f, patterns)]
                    assert not left_out, f"line {ins.line}: .dockerignore leaves out {left_out}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", "runs/demo/run.yaml", ".git/HEAD", "build/lib/x.py",
                 "dist/ftlaunch-0.1.0-py3-none-any.whl", "ftlaunch.egg-info/PKG-INFO",
                 "launcher/ftlaunch/__pycache__/cli.cpython-311.pyc", ".whl/torch.whl"):
        assert ignored(path, patterns), f"{path} would be sent to the docker daemon"
    for path in ("launcher/ftlaunch/cli.py", "pyproject.toml", "constraints.txt", "README.md"):
        assert not ignored(path, patterns)


def test_the_image_gets_every_file_the_package_build_needs(dockerfile):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()}
    copied = set(copy_destinations(dockerfile).values())
    missing = {n for n in needed if not any(within(n, c) for c in copied)}
    assert not missing, f"the image builds ftlaunch without {sorted(missing)}"


def test_pip_installs_are_pinned_by_constraints_txt(dockerfile, constraints):
    installs = pip_installs(dockerfile)
    assert installs, "no pip install"
    placed = copy_destinations(dockerfile)
    for pip in installs:
        where = f"line {dockerfile.instructions[pip.index].line}"
        used = [v for o, v in pip.options if o in ("-c", "--constraint")]
        uses_constraints = any(placed.get(str(PurePosixPath(pip.workdir) / v)) == "constraints.txt"
                               for v in used if v)
        assert not used or uses_constraints, \
            f"{where}: -c {used} is not the repository's constraints.txt as copied into the image"
        for spec in pip.requirements:
            name, extras, version = requirement(spec)
            if name is None:
                assert uses_constraints, f"{where}: the project is installed without -c constraints.txt"
            elif version is None:
                assert uses_constraints and name in constraints, \
                    f"{where}: {spec} is not pinned (neither ==VERSION nor by constraints.txt)"
            if name == "deepspeed" or "deepspeed" in extras:
                # Source only: with build isolation its build would fetch another torch.
                assert pip.env.get("DS_BUILD_OPS") == "0" and ("--no-build-isolation", None) \
                    in pip.options, f"{where}: deepspeed needs DS_BUILD_OPS=0 --no-build-isolation"


def test_torch_and_every_pinned_version_agree_with_constraints_txt(dockerfile, constraints):
    pins = []  # (where, package, version)
    for pip in pip_installs(dockerfile):
        for spec in pip.requirements:
            name, _, version = requirement(spec)
            if name and version:
                pins.append((f"line {dockerfile.instructions[pip.index].line}: {spec}", name, version))
    assert any(name == "torch" for _, name, _ in pins), "torch is not pip-installed with ==VERSION"
    wrong = [f"{where} (constraints.txt: {constraints[name]})" for where, name, version in pins
             if name in constraints and version.split("+")[0] != constraints[name]]
    assert not wrong, "versions that disagree with constraints.txt: " + "; ".join(wrong)


def test_the_build_runs_pip_check_after_the_last_install(dockerfile):
    last_install = max(p.index for p in pip_installs(dockerfile))
    checks = [i for i, ins in dockerfile.all("RUN")
              if any(_is_pip_check(words) for words in shell_commands(ins.args))]
    assert checks and max(checks) >= last_install, "no pip check after the last pip install"
    # In the same RUN, the check must come after the install.
    _, ins = next((i, ins) for i, ins in dockerfile.all("RUN") if i == last_install)
    commands = shell_commands(ins.args)
    installs = [n for n, w in enumerate(commands) if _after_pip_install(w) is not None]
    if max(checks) == last_install:
        assert any(_is_pip_check(w) for w in commands[max(installs):])


def _is_pip_check(words: list[str]) -> bool:
    joined = " ".join(words)
    return bool(re.search(r"(^|\s|/)pip3? check\b|-m pip check\b", joined))


def test_the_image_installs_only_pinned_dependencies(constraints):
    """`pip install -c constraints.txt .[deepspeed]` pins what constraints.txt names;
    a dependency it does not name would float from build to build."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = set(constraints)
    deps = [*project["dependencies"], *project["optional-dependencies"]["deepspeed"]]
    names = {canonical(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in deps}
    assert names <= pinned, f"not in constraints.txt: {sorted(names - pinned)}"


def test_parser_reads_continuations_flags_and_quoted_commands():
    text = ("FROM nvidia/cuda:13.0.2-devel-ubuntu24.04\n"
            "# a comment\n"
            "RUN a \\\n"
            "    # dropped inside a continuation\n"
            "    && b \"x; y && z\"\n"
            "COPY --chown=1000:1000 launcher/ /src/launcher/\n"
            'ENTRYPOINT ["ftlaunch"]\n')
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["FROM", "RUN", "COPY", "ENTRYPOINT"]
    assert ins[1].line == 3 and shell_commands(ins[1].args) == [["a"], ["b", "x; y && z"]]
    assert leading_flags(ins[2].args) == ({"chown": "1000:1000"}, "launcher/ /src/launcher/")
    patterns = [(False, re.compile(_glob_regex("**/__pycache__"))),
                (False, re.compile(_glob_regex("docs"))), (True, re.compile(_glob_regex("docs/keep.md")))]
    assert ignored("launcher/__pycache__/x.pyc", patterns) and ignored("docs/a.md", patterns)
    assert not ignored("docs/keep.md", patterns) and not ignored("launcher/x.py", patterns)
    assert requirement(".[deepspeed]") == (None, {"deepspeed"}, None)
    assert requirement("PyYAML==6.0.4") == ("pyyaml", set(), "6.0.4")


# --- docker/README.md ----------------------------------------------------------------

def readme_commands() -> list[list[str]]:
    """Every command line in the README's fenced code blocks, continuations joined."""
    text = README.read_text()
    commands = []
    for m in re.finditer(r"^([ \t]*)```[^\n]*\n(.*?)^\1```", text, re.M | re.S):
        block = "\n".join(line[len(m.group(1)):] for line in m.group(2).splitlines())
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


_DOCKER_BOOL = {"--rm", "--init", "--privileged", "--read-only", "--interactive", "--tty",
                "--detach", "--check", "--no-cache", "--pull", "--load", "--push", "--quiet",
                "-q", "-P", "--publish-all"}


def docker_options(command: str, words: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """`docker run --rm -v a:b --ipc=host IMAGE args` ->
    ([('--rm', None), ('-v', 'a:b'), ('--ipc', 'host')], ['IMAGE', 'args']).
    Any other option takes a value; -t is --tty for run, a value for build and stop."""
    options, i = [], 0
    while i < len(words) and words[i].startswith("-"):
        name, eq, value = words[i].partition("=")
        if eq:
            options.append((name, value))
        elif name in _DOCKER_BOOL or (command == "run" and re.fullmatch(r"-[dit]+", name)):
            options.append((name, None))
        else:
            i += 1
            options.append((name, words[i] if i < len(words) else None))
        i += 1
    return options, words[i:]


def option(options, *names) -> list[str | None]:
    return [v for n, v in options if n in names]


@pytest.fixture(scope="module")
def readme():
    commands = readme_commands()
    builds = [c[2:] for c in commands if c[:2] == ["docker", "build"]]
    runs = [c[2:] for c in commands if c[:2] == ["docker", "run"]]
    stops = [c[2:] for c in commands if c[:2] == ["docker", "stop"]]
    return builds, runs, stops, [c for c in commands if c[0] == "ftlaunch"]


def test_readme_builds_the_dockerfile_from_the_repository_root(readme):
    builds, _, _, _ = readme
    assert builds, "docker/README.md has no docker build command"
    for words in builds:
        options, positional = docker_options("build", words)
        files = option(options, "-f", "--file")
        assert files and all((ROOT / f).resolve() == DOCKERFILE for f in files), \
            f"docker build {' '.join(words)}: -f must name docker/Dockerfile (from the repo root)"
        assert positional == ["."], \
            f"docker build {' '.join(words)}: the context must be the repository root '.'"
    assert any(option(docker_options("build", w)[0], "-t", "--tag") for w in builds), \
        "no docker build is tagged"


def test_readme_runs_the_built_image_with_real_ftlaunch_flags(readme):
    builds, runs, _, lines = readme
    tags = {t for w in builds for t in option(docker_options("build", w)[0], "-t", "--tag")}
    assert len(runs) >= 3, "docker/README.md should show single-node, multi-node and plan runs"
    for words in runs:
        options, positional = docker_options("run", words)
        assert positional and positional[0] in tags, \
            f"docker run {' '.join(words)}: the image is not the one built ({tags})"
        try:
            parse_ftlaunch(positional[1:])
        except click.UsageError as exc:
            pytest.fail(f"docker run ... {' '.join(positional)}: {exc.format_message()}")
    for words in lines:
        try:
            parse_ftlaunch(words[1:])
        except click.UsageError as exc:
            pytest.fail(f"{' '.join(words)}: {exc.format_message()}")


def test_readme_training_runs_keep_their_runs_and_get_their_grace(readme, dockerfile):
    _, runs, stops, _ = readme
    volumes = dockerfile.volumes()
    workdir = dockerfile.final_workdir
    hf_home = dockerfile.env()["HF_HOME"]
    graces = []
    trainings = 0
    for words in runs:
        options, positional = docker_options("run", words)
        command, params = parse_ftlaunch(positional[1:])
        if command != "train":
            continue
        trainings += 1
        shown = "docker run " + " ".join(words)
        mounts = [v.split(":")[1] for v in option(options, "-v", "--volume") if v and ":" in v]
        mounts += [re.search(r"(?:target|dst|destination)=([^,]+)", v).group(1)
                   for v in option(options, "--mount") if v]
        output = str(PurePosixPath(workdir) / (params["output_dir"] or f"runs/{params['model']}"))
        assert any(within(output, m) and m in volumes for m in mounts), (
            f"{shown}: --output-dir {output} is not on a mounted VOLUME ({volumes}): "
            "docker run --rm would delete the run")
        assert any(within(hf_home, m) for m in mounts), \
            f"{shown}: nothing is mounted on the Hugging Face cache ({hf_home})"
        grace = grace_s(params)
        graces.append(grace)
        timeouts = option(options, "--stop-timeout")
        assert timeouts and int(timeouts[-1]) > grace, (
            f"{shown}: --stop-timeout must exceed --grace ({grace:.0f} s): docker stop "
            "SIGKILLs after 10 s by default, before the checkpoint is written")
        if option(options, "--gpus"):
            assert option(options, "--ipc") == ["host"] or option(options, "--shm-size"), \
                f"{shown}: /dev/shm is 64 MB without --ipc=host or --shm-size"
        if (params.get("nnodes") or 1) > 1:
            assert set(option(options, "--network", "--net")) == {"host"}, \
                f"{shown}: several nodes need --network host (NCCL, the master port)"
    assert trainings >= 2, "docker/README.md should show a single-node and a multi-node training"
    assert stops, "docker/README.md does not show docker stop with a timeout"
    for words in stops:
        timeout = option(docker_options("stop", words)[0], "-t", "--time", "--timeout")
        assert timeout and int(timeout[-1]) > max(graces), \
            f"docker stop {' '.join(words)}: the timeout must exceed --grace ({max(graces):.0f} s)"


# --- docker itself, where it is installed --------------------------------------------

def _no_docker_daemon() -> str | None:
    """Why docker cannot be used here, or None when a daemon answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on PATH"
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 10 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"no docker daemon reachable ({last})"
    return None


# Failures that say the registry is out of reach, not that the Dockerfile is wrong.
_OFFLINE = ("failed to resolve source metadata", "failed to do request", "dial tcp",
            "no such host", "i/o timeout", "TLS handshake timeout", "connection refused")


def test_buildkit_lint_passes():
    reason = _no_docker_daemon()
    if reason:
        pytest.skip(f"docker build --check not run: {reason}")
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker build --check needs BuildKit's buildx plugin, which is not installed")
    proc = subprocess.run(["docker", "build", "--check", "-f", str(DOCKERFILE), "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(marker in output for marker in _OFFLINE):
        pytest.skip(f"docker build --check could not reach the registry: {output[-300:]}")
    assert proc.returncode == 0, output


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_image_builds_and_runs_ftlaunch_as_non_root(tmp_path):
    if os.environ.get("FTLAUNCH_DOCKER_BUILD") != "1":
        pytest.skip("set FTLAUNCH_DOCKER_BUILD=1 to build the image (gigabytes, needs Docker Hub and PyPI)")
    reason = _no_docker_daemon()
    if reason:
        pytest.skip(reason)
    tag = f"ftlaunch:test-{os.getpid()}"
    build = subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, "."], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    try:
        def run(*args, entrypoint=None):
            prefix = ["--entrypoint", entrypoint] if entrypoint else []
            return subprocess.run(["docker", "run", "--rm", *prefix, tag, *args],
                                  capture_output=True, text=True, timeout=600)

        version = run("--version")
        assert version.returncode == 0 and "ftlaunch" in version.stdout, version.stderr
        uid = run("-u", entrypoint="id")
        assert uid.returncode == 0 and uid.stdout.strip() not in ("", "0"), uid.stdout
        libs = run("-c", "import torch, deepspeed, bitsandbytes; assert torch.version.cuda",
                   entrypoint="python")
        assert libs.returncode == 0, libs.stderr[-2000:]
        # The exit code is ftlaunch's: a user error is 2, not docker's 125/126/127.
        assert run("--no-such-flag").returncode == 2
        plan = run("plan", "--model", "llama-8b", "--hardware", "8xH100-80GB")
        assert plan.returncode == 0 and "fits" in plan.stdout, plan.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
