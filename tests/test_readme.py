"""The README's commands are ones the programs take: what a user copies to reproduce a row must run."""
import importlib
import os
import re
import shlex

from advent_fast import train
from advent_fast.config import list_presets, parse_yaml

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
PROGRAMS = ("train", "evaluate", "predict", "visualize", "data.prior", "data.verify")


def readme() -> str:
    with open(README) as f:
        return f.read()


def resolved_train_config(args, capsys):
    """``python -m advent_fast.train ARGS --print-config``: the settings resolve; the resolved config."""
    capsys.readouterr()
    assert train.main([*args, "--print-config"]) == 0, args
    return parse_yaml(capsys.readouterr().out)


def paper_rows():
    """(preset, the 'how' cell's commands) of the table of the paper's rows."""
    lines = readme().split("| `--config` | row | how | paper |\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    rows, preset = [], None
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        preset = cells[0].strip("`") or preset
        rows.append((preset, re.findall(r"`([^`]+)`", cells[2])))
    return rows


def program_main(program):
    return importlib.import_module(f"advent_fast.{program}").main


def test_every_preset_has_its_rows_and_each_row_resolves(capsys, parses_only):
    rows = paper_rows()
    assert {preset for preset, _ in rows} == set(list_presets()) - {"embedded"}
    roots = ["--source-root", "DATA/SOURCE", "--target-root", "DATA/Cityscapes"]
    for preset, commands in rows:
        for command in commands:
            words = shlex.split(command)
            if words[:3] == ["python", "-m", "advent_fast.evaluate"]:
                parses_only(program_main("evaluate"), words[3:])
                continue
            assert words[0] == "--mode", (preset, command)
            overrides = [*words, *(roots if "--source-root" not in words else roots[2:])]
            config = resolved_train_config(["--config", preset, *overrides], capsys)
            assert config["train"]["mode"] == words[1]
    assert sum(len(commands) for _, commands in rows) == 11  # each row but the SYNTHIA ensemble ("as above")


def commands_in_readme():
    """Every whole ``python -m advent_fast.PROGRAM ...`` command (code blocks with their continuation lines
    joined, inline code across line breaks), ``[optional]`` parts left out; those with placeholders a user
    fills in (``...``, ``<run>``) left out."""
    text = readme()
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
    snippets = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    snippets += [code.replace("\n", " ") for code in re.findall(r"`([^`]+)`", prose)]
    commands = []
    for snippet in snippets:
        match = re.search(r"python -m advent_fast\.([\w.]+)([^#]*)", re.sub(r" \[[^\]]*\]", "", snippet))
        if match and match.group(1) in PROGRAMS and not re.search(r"\.\.\.|<", match.group(2)):
            commands.append((match.group(1), shlex.split(match.group(2))))
    return commands


def test_every_whole_command_parses(capsys, parses_only):
    commands = commands_in_readme()
    assert {program for program, _ in commands} == set(PROGRAMS)
    for program, args in commands:
        if program == "train":
            resolved_train_config(args, capsys)
        else:
            parses_only(program_main(program), args)
