"""README.md and docs/*.md against the CLI itself: every ``reptok ...`` command line they show
(code blocks and inline code) names a real command and only options that command declares, and
every command they name answers ``--help``."""

import functools
import re
import shlex
from pathlib import Path

import pytest
import typer

from clihelp import runner
from reptok_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list:
    """``reptok ...`` invocations of a markdown text: code-block lines (continuations joined,
    ``python -m reptok_cli`` / ``torchrun ... -m reptok_cli`` included) and inline code spans."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^.*?-m reptok_cli\b", "reptok", line.strip().lstrip("$ "))
            out.extend(m.group(0) for m in re.finditer(r"(?<![\w/.-])reptok( [^|;&#]*)?", line))
    for span in inline_spans(text):
        span = re.sub(r"^.*?-m reptok_cli\b", "reptok", span)
        if re.match(r"reptok( |$)", span):
            out.append(span)
    return out


def inline_spans(text: str) -> list:
    """The inline code spans outside code blocks, a line break inside one read as a space."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]


# Bare options the docs name that belong to other tools (torchrun, sbatch, the benchmark scripts)
# or that the docs name to say they do not exist.
OTHER_TOOLS = {"--nproc-per-node", "--max-restarts", "--signal", "--repeat", "--quick", "--list", "--cache",
               "--deterministic"}


def _tokens(line: str) -> list:
    try:
        return shlex.split(line)
    except ValueError:  # an unbalanced quote in an example's prose
        return line.split()


@functools.lru_cache(maxsize=None)
def tree():
    """The CLI's click command tree (built once: typer builds a new one per call)."""
    return typer.main.get_command(app)


def resolve(line: str):
    """(command path, click command, option names used) of one ``reptok ...`` line."""
    cmd, path = tree(), ["reptok"]
    words = _tokens(line)[1:]
    while words and words[0] in getattr(cmd, "commands", {}):
        path.append(words[0])
        cmd = cmd.commands[words.pop(0)]
    opts = [w.split("=", 1)[0] for w in words if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w)]
    return " ".join(path), cmd, opts


def declared(cmd) -> set:
    names = {"--help"}
    for p in cmd.params:
        names.update(p.opts, p.secondary_opts)
    return names


CASES = [(doc.name, line) for doc in DOCS for line in command_lines(doc.read_text())]


def test_the_parser_finds_what_a_reader_sees():
    text = ("Run `reptok sample --ckpt runs/gen -q` or `torchrun ... -m\nreptok_cli extract --data d` or\n```bash\n$ reptok train recon --data d \\\n  --preset tiny"
            "  # comment\ntorchrun --nproc-per-node 8 -m reptok_cli bench --steps 2 | tee x\n```\n")
    lines = command_lines(text)
    assert lines == ["reptok train recon --data d    --preset tiny  ", "reptok bench --steps 2 ",
                     "reptok sample --ckpt runs/gen -q", "reptok extract --data d"]
    assert resolve(lines[0])[0] == "reptok train recon" and resolve(lines[0])[2] == ["--data", "--preset"]
    assert "--no-cuda-graphs" in declared(resolve("reptok sample")[1])  # a flag's off switch counts


@pytest.mark.parametrize("doc, line", CASES, ids=[f"{d}:{line[:60]}" for d, line in CASES])
def test_documented_options_exist(doc, line):
    path, cmd, opts = resolve(line)
    unknown = [o for o in opts if o not in declared(cmd)]
    assert not unknown, f"{doc}: `{line.strip()}`: {path} has no {', '.join(unknown)}"


def test_options_named_in_prose_exist():
    """A bare option in inline code (`--weights-dtype`, `--hflip/--no-hflip`) is some command's."""
    def commands(cmd):
        return [c for sub in cmd.commands.values() for c in commands(sub)] if hasattr(cmd, "commands") else [cmd]

    known = set().union(*(declared(c) for c in commands(tree()))) | OTHER_TOOLS
    for doc in DOCS:
        for span in inline_spans(doc.read_text()):
            if span.startswith("-"):
                unknown = [o for o in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", span) if o not in known]
                assert not unknown, f"{doc.name}: `{span}` names {unknown}, which no reptok command has"


@pytest.mark.parametrize("path", sorted({resolve(line)[0] for _, line in CASES}))
def test_every_documented_command_answers_help(path):
    res = runner.invoke(app, path.split()[1:] + ["--help"])
    assert res.exit_code == 0 and "Usage" in res.output, res.output


def test_info_and_train_agree_on_the_default_preset():
    import json

    recon = tree().commands["train"].commands["recon"]
    train_default = next(p.default for p in recon.params if p.name == "preset")
    res = runner.invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["preset"] == train_default == "small"
