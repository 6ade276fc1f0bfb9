"""Every command line shown in README.md and docs/**/*.md parses: the program exists and
argparse accepts every flag, so a doc cannot drift from the CLI.

What is checked, in ```bash / ```sh / ```shell / ```console blocks (lines joined at a trailing
backslash, comments dropped, `&&`, `||`, `;` and `|` split into commands, leading `VAR=value`
assignments and a `$ ` prompt removed):
- `fusedkv-*`: a console script of setup.py; its argument parser accepts the arguments;
- `python -m fusedkv_megatron.X`, `python tools/X.py`, `python slurm/X.py` (any `python*` or
  `.venv/bin/python`), and `torchrun [its flags] -m MODULE | SCRIPT`: the module or script
  exists and its parser accepts the arguments (torchrun's own flags through torchrun's parser);
- `bash X.sh`, `sh X.sh`, `./X.sh`, `sbatch X`: the script exists;
- any argument of those programs that names a path in the repository (examples/, tools/,
  slurm/*.py|*.sh, docs/, fusedkv_megatron/, tests/) exists.
Other programs (pip, tensorboard, tail, squeue, ...) are not ours and are skipped.

The parser runs inside the program itself, up to its first argparse call and no further:
`ArgumentParser.parse_args`/`parse_known_args` are wrapped to stop the program right after
parsing, so nothing trains, converts or submits. A documented Python program must therefore
parse its command line with argparse before it does any work (one that does not is reported,
"returned" before parsing). Abbreviated flags are refused: a doc spells
every flag out. A bare `...` stands for "the flags shown
before" and is dropped; placeholder values (DATA_text_document, CKPT_DIR) parse as any value.

A snippet that is intentionally not a runnable command (pseudo-syntax, another tool's output)
is marked by an HTML comment on the line before its opening fence, invisible when rendered:

    <!-- doc-commands: skip -->
    ```bash
    ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_MARK = "<!-- doc-commands: skip -->"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
REPO_PATH = re.compile(r"^(examples|tools|docs|fusedkv_megatron|tests)/|^slurm/[^/]+\.(py|sh)$")


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def commands_in(text: str, name: str) -> list[Command]:
    """The commands of the shell blocks of one markdown text (see the module docstring)."""
    out: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence.group(2)):
            end += 1
        if fence.group(3) in SHELL_LANGS and before != SKIP_MARK:
            out += _block_commands(lines[i + 1 : end], name, i + 2)
        i = end + 1
    return out


def _block_commands(block: list[str], name: str, first_line: int) -> list[Command]:
    out, joined, start = [], "", None
    for n, line in enumerate(block, start=first_line):
        start = n if start is None else start
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        for argv in _split(joined.strip().removeprefix("$ ")):
            out.append(Command(f"{name}:{start}", argv))
        joined, start = "", None
    return out


def _split(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    result = []
    for argv in commands:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]  # VAR=value before a command
        if argv:
            result.append(argv)
    return result


def console_scripts() -> dict[str, str]:
    """{"fusedkv-pretrain": "fusedkv_megatron.pretrain:main", ...} from setup.py."""
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(fusedkv-[\w-]+)=([\w.]+:\w+)"', text))


class _Parsed(Exception):
    def __init__(self, extras: list[str]):
        super().__init__(extras)
        self.extras = extras


@contextlib.contextmanager
def _stop_after_parsing():
    """The program's first (outermost) argparse call parses, then stops the program."""
    parse_args, parse_known = (
        argparse.ArgumentParser.parse_args,
        argparse.ArgumentParser.parse_known_args,
    )
    depth = [0]

    def outer_parse_args(self, args=None, namespace=None):
        self.allow_abbrev = False  # a doc spells every flag out
        depth[0] += 1
        try:
            parse_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise _Parsed([])

    def outer_parse_known(self, args=None, namespace=None):
        if depth[0]:
            return parse_known(self, args, namespace)
        self.allow_abbrev = False
        _, extras = parse_known(self, args, namespace)
        raise _Parsed(extras)

    argparse.ArgumentParser.parse_args = outer_parse_args
    argparse.ArgumentParser.parse_known_args = outer_parse_known
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = parse_args
        argparse.ArgumentParser.parse_known_args = parse_known


def _run_until_parsed(kind: str, target: str, args: list[str]) -> str | None:
    """Run a console script / module / script with `args` up to its parsing; None when the
    arguments parse, else the reason."""
    import importlib

    err = io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    try:
        with (
            _stop_after_parsing(),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            if kind == "entry":
                module, func = target.split(":")
                code = getattr(importlib.import_module(module), func)()
            elif kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
                code = "returned"
            else:
                sys.path.insert(0, str(Path(target).parent))
                runpy.run_path(target, run_name="__main__")
                code = "returned"
    except _Parsed as parsed:
        return f"unrecognized arguments: {' '.join(parsed.extras)}" if parsed.extras else None
    except SystemExit as e:
        if e.code in (0, None):
            return None  # --help
        code = e.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    last = (err.getvalue().strip().splitlines() or [""])[-1]
    return f"refused (exit {code}): {last[-600:]}"


def _python_target(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, target, args) of `python [-u] -m MODULE ...` or `python SCRIPT ...`."""
    rest = argv[1:]
    while rest and rest[0] in ("-u", "-O", "-B"):
        rest = rest[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return ("module", rest[1], rest[2:]) if rest[1].startswith("fusedkv_megatron") else None
    if rest and rest[0].endswith(".py"):
        return "script", rest[0], rest[1:]
    return None


def check(command: Command) -> list[str]:
    """What is wrong with one command ([] when nothing)."""
    argv = [a for a in command.argv if a != "..."]
    prog = argv[0]
    problems: list[str] = []
    target = None
    if prog.startswith("fusedkv-"):
        scripts = console_scripts()
        if prog not in scripts:
            return [f"{prog}: no such console script in setup.py ({', '.join(sorted(scripts))})"]
        target = ("entry", scripts[prog], argv[1:])
    elif re.match(r"^(\S*/)?python[\d.]*$", prog):
        target = _python_target(argv)
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                ns = get_args_parser().parse_args(argv[1:])
        except SystemExit:
            return [f"torchrun: {err.getvalue().strip()[-400:]}"]
        kind = "module" if ns.module else "script"
        target = (kind, ns.training_script, ns.training_script_args)
    elif prog in ("bash", "sh", "sbatch") or prog.endswith(".sh"):
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        script = prog if prog.endswith(".sh") else script
        if script and not (REPO / script.removeprefix("./")).exists():
            problems.append(f"{script}: no such file in the repository")
        return problems
    if target is None:
        return []  # not one of ours
    kind, name, args = target
    if kind == "script" and not (REPO / name).is_file():
        return [f"{name}: no such file in the repository"]
    if kind == "module" and not _module_exists(name):
        return [f"-m {name}: no such module"]
    for arg in args:
        for part in arg.split("="):
            if REPO_PATH.match(part) and not (REPO / part).exists():
                problems.append(f"{part}: no such path in the repository")
    where = str(REPO / name) if kind == "script" else name
    reason = _run_until_parsed(kind, where, args)
    if reason:
        problems.append(f"{' '.join(argv[:2])} ...: {reason}")
    return problems


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def all_commands() -> list[Command]:
    return [c for f in doc_files() for c in commands_in(f.read_text(), str(f.relative_to(REPO)))]


def test_every_documented_command_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # --config examples/... and script paths are relative to the repo
    commands = all_commands()
    assert len(commands) > 30, "the doc blocks were not found"
    ours = [c for c in commands if c.argv[0].startswith(("fusedkv-", "python", "torchrun"))]
    assert any(c.argv[0] == "fusedkv-pretrain" for c in ours)
    problems = [f"{c.where}: {p}" for c in commands for p in check(c)]
    assert not problems, "\n".join(problems)


NEGATIVE = """
Text.

```bash
fusedkv-pretrain --config examples/configs/tiny.yaml \\
    --num-layer 4 --mock-data
fusedkv-pretrian --help
python tools/no_such_tool.py --x 1
torchrun --nproc-per-node 2 -m fusedkv_megatron.pretrain --lr-decay-style cosinus
bash examples/missing.sh
fusedkv-eval CKPT --tasks t --config examples/configs/nothere.yaml
fusedkv-pretrain ... --train-samples 100 --lr-wsd-decay-style linear   # placeholders are fine
```

<!-- doc-commands: skip -->
```bash
fusedkv-pretrain --not-a-flag
```
"""


def test_a_misspelled_flag_or_program_in_a_doc_fails(monkeypatch):
    """The checker itself: each broken line of NEGATIVE is reported, with its line number;
    the skipped block and the placeholder line are not."""
    monkeypatch.chdir(REPO)
    commands = commands_in(NEGATIVE, "negative.md")
    assert [c.where for c in commands] == [f"negative.md:{n}" for n in (5, 7, 8, 9, 10, 11, 12)]
    assert commands[0].argv[-3:] == ["--num-layer", "4", "--mock-data"]  # joined at the "\"
    found = {c.where: " ".join(check(c)) for c in commands}
    assert "unrecognized arguments: --num-layer" in found["negative.md:5"]
    assert "fusedkv-pretrian: no such console script" in found["negative.md:7"]
    assert "tools/no_such_tool.py: no such file" in found["negative.md:8"]
    assert "invalid choice: 'cosinus'" in found["negative.md:9"]
    assert "examples/missing.sh: no such file" in found["negative.md:10"]
    assert "examples/configs/nothere.yaml: no such path" in found["negative.md:11"]
    assert found["negative.md:12"] == ""


@pytest.mark.parametrize(
    "line,expected",
    [
        ("A=1 B='x y' bash tools/test.sh -q", [["bash", "tools/test.sh", "-q"]]),
        ("squeue --me; scontrol show job 1 | grep -E 'A|B'",
         [["squeue", "--me"], ["scontrol", "show", "job", "1"], ["grep", "-E", "A|B"]]),
        ("make && fusedkv-plan --config x.yaml  # a comment with 'quotes'",
         [["make"], ["fusedkv-plan", "--config", "x.yaml"]]),
    ],
)  # fmt: skip
def test_command_lines_split_like_a_shell(line, expected):
    assert _split(line) == expected
