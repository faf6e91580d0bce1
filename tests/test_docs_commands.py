"""Every `ctxdistill` command the documentation shows composes with the current configs and passes validation,
and every `ctxdistill-compare` / `ctxdistill-eval` command parses.

The commands are read from README.md and docs/ (code blocks and inline code), from conf/ (comments and the help
text) and from the comments of sweeps/*.sh; the commands sweeps/beyond_window.sh builds for the learning curve's
figure are recorded from the script itself. Placeholders (PATH, DIR, $VARS, …) become a temporary directory, a
multirun is split into its cells as the sweeper splits it, and each cell is composed and validated; no data or
model is loaded. The two tools' commands go through their argument parsers (not the checks of the paths they name).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Iterator, Optional

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, open_dict

from ctxdistill.cli import CONFIG_DIR, sweep_cells, unswept, user_error_message, user_errors
from ctxdistill.config import validate
from ctxdistill.evaluate_run import argument_parser as eval_parser
from ctxdistill.learning_curve import argument_parser as learning_curve_parser
from ctxdistill.results.cli import argument_parser as compare_parser

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMENTED = [*sorted((ROOT / "conf").rglob("*.yaml")), *sorted((ROOT / "sweeps").glob("*.sh"))]

# Commands that select a config a guide writes and the checkout does not hold, and why they are not checked here.
GUIDE_ONLY = {
    "cd_hard": "the guide's method composes only with its Python module loaded, which would stay registered in "
    "this process; tests/test_guides.py runs the method from the guide's two files in a process of its own",
}
# The guide's own config file, written where the guide says, so that its commands compose with it.
GUIDE_CONFIGS = {"docs/guides/add-a-dataset.md": "conf/dataset/reviews.yaml"}

# Hydra's flags that take a value (--info's is optional: one of these words).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
ELLIPSES = ("…", "...")
PLACEHOLDER = re.compile(r"\$\{[^}]*\}|\$\w+|\b[A-Z_]*(?:PATH|DIR|DATA)\b")


# The tools besides `ctxdistill` whose documented commands are parsed, by their argument parsers.
TOOLS = {"ctxdistill-compare": compare_parser, "ctxdistill-eval": eval_parser}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written (one logical line of a code block, or an inline span)
    args: tuple[str, ...]  # its arguments, placeholders made concrete
    config_dir: Optional[Path] = None  # a guide's own configs, joined to the search path
    program: str = "ctxdistill"  # or one of TOOLS


def shell_lines(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """Logical lines (backslash continuations joined) with the number of their first line."""
    start, joined = first, ""
    for number, line in enumerate(lines, first):
        if not joined:
            start = number
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield start, joined + line
        joined = ""
    if joined:
        yield start, joined


def command_lines(text: str) -> Iterator[list[str]]:
    """The words of each simple command in a shell line (split at ;, &&, ||, |), quotes and comments removed."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words: list[str] = []
    for token in lexer:
        if set(token) <= set(";&|"):
            yield words
            words = []
        else:
            words.append(token)
    yield words


def program_args(words: list[str]) -> Optional[tuple[str, list[str]]]:
    """The program and arguments of a ``ctxdistill`` command (also ``python -m ctxdistill``, ``torchrun ... -m
    ctxdistill``) or of one of TOOLS."""
    if words[:1] and words[0] in ("ctxdistill", *TOOLS):
        return words[0], words[1:]
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["-m", "ctxdistill"]:
            return "ctxdistill", words[i + 2 :]
    return None


def concrete(word: str, tmp: Path) -> str:
    """A word with its placeholders (PATH, DIR, $VARS, …) made a path."""
    for ellipsis in ELLIPSES:
        word = word.replace(ellipsis, str(tmp))
    return PLACEHOLDER.sub(str(tmp), word)


def commands_in(path: Path, line: int, text: str, tmp: Path) -> Iterator[DocCommand]:
    where = f"{path.relative_to(ROOT)}:{line}"
    try:
        simple = list(command_lines(text))
    except ValueError:  # unbalanced quotes: not shell (prose in inline code)
        return
    for words in simple:
        found = program_args(words)
        if found is None:
            continue
        program, args = found
        # an ellipsis on its own is "and the rest of the command": nothing to check
        made = tuple(concrete(word, tmp) for word in args if word not in ELLIPSES)
        yield DocCommand(where, " ".join([program, *args]), made, program=program)


def inline_spans(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """Inline `code` spans of a paragraph (they may wrap), with the line they start on."""
    text = "\n".join(lines)
    for match in re.finditer(r"`([^`]+)`", text):
        yield first + text.count("\n", 0, match.start()), match.group(1).replace("\n", " ")


def markdown_commands(path: Path, tmp: Path) -> Iterator[DocCommand]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```"))
            variable, values = "", [""]  # a `for VARIABLE in VALUES; do ... done` loop's
            for number, line in shell_lines(lines[i + 1 : end], i + 2):
                loop = re.match(r"\s*for (\w+) in ([^;]+); do", line)
                if loop:
                    variable, values = f"${loop[1]}", loop[2].split()
                elif line.strip() == "done":
                    variable, values = "", [""]
                for value in values:
                    yield from commands_in(path, number, line.replace(variable, value) if variable else line, tmp)
            i = end + 1
            continue
        end = next((j for j in range(i, len(lines)) if not lines[j].strip() or "```" in lines[j]), len(lines))
        for number, span in inline_spans(lines[i : max(end, i + 1)], i + 1):
            if re.match(r"(python -m )?ctxdistill(-compare|-eval)? ", span):
                yield from commands_in(path, number, span, tmp)
        i = max(end, i + 1)


def commented_commands(path: Path, tmp: Path) -> Iterator[DocCommand]:
    """Commands in a YAML file's comments and help text, and in a shell script's comments."""
    lines = path.read_text().splitlines()
    if path.suffix == ".sh":
        lines = [line if line.lstrip().startswith("#") else "" for line in lines]
    lines = [line.strip().lstrip("#").strip() for line in lines]
    for number, line in shell_lines(lines, 1):
        if re.match(r"ctxdistill(-compare|-eval)? ", line):
            yield from commands_in(path, number, line, tmp)
        for span_line, span in inline_spans([line], number):
            if re.match(r"ctxdistill(-compare|-eval)? ", span):
                yield from commands_in(path, span_line, span, tmp)


def guide_config(guide: Path, config: str, tmp: Path) -> Path:
    """The YAML block after the guide names ``config``, written under a config directory of its own."""
    text = guide.read_text()
    block = re.search(r"```yaml\n(.*?)```", text[text.index(f"`{config}`") :], re.DOTALL).group(1)
    written = tmp / "guide_conf" / Path(config).relative_to("conf")
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(block)
    return tmp / "guide_conf"


def documented_commands(tmp: Path) -> list[DocCommand]:
    config_dirs = {file: guide_config(ROOT / file, config, tmp) for file, config in GUIDE_CONFIGS.items()}
    found = []
    for path in MARKDOWN:
        config_dir = config_dirs.get(str(path.relative_to(ROOT)))
        found += [DocCommand(c.where, c.text, c.args, config_dir, c.program) for c in markdown_commands(path, tmp)]
    for path in COMMENTED:
        found += commented_commands(path, tmp)
    return found


def overrides_of(command: DocCommand) -> tuple[bool, list[str]]:
    """Whether the command is a multirun, and its overrides (Hydra's flags dropped, --config-dir a search path)."""
    multirun, overrides, search = False, [], [command.config_dir] if command.config_dir else []
    args = list(command.args)
    while args:
        arg = args.pop(0)
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in FLAGS_WITH_VALUE and args:
            value = args.pop(0)
            if arg in ("--config-dir", "-cd"):
                search.append(Path(value))
        elif arg in ("--info", "-i"):
            if args and args[0] in INFO_VALUES:
                args.pop(0)
        elif not arg.startswith("-"):
            overrides.append(arg)
    if search:
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{directory}' for directory in search)}]")
    return multirun, overrides


def shapes_composition(override: Override) -> bool:
    """Whether an override takes part in composing the defaults (a config group's option, Hydra's own settings
    such as its search path) rather than setting a value of the composed config."""
    key = override.key_or_group
    return key.startswith("hydra") or (CONFIG_DIR / key).is_dir()


class Checker:
    """Composes and validates commands. A compose takes 0.2 s, so each set of config-group choices is composed
    once and the other overrides are applied to a copy, the step with which Hydra ends its own compose."""

    def __init__(self, tmp: Path):
        self.output_dir = tmp / "run"
        self.composed: dict[tuple[str, ...], DictConfig] = {}  # with Hydra's settings (hydra.sweeper.params)
        self.jobs: dict[tuple[str, ...], DictConfig] = {}  # without: a run's config, as compose() returns it
        self.cells: dict[tuple[str, ...], Optional[str]] = {}  # a cell's problem, None: none

    def choices(self, overrides: list[str]) -> tuple[tuple[str, ...], list[Override]]:
        """The overrides that shape the composition, composed once, and the values to set in a copy."""
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = tuple(o.input_line for o in parsed if shapes_composition(o))
        if choices not in self.composed:
            overrides = [f"output_dir={self.output_dir}", *choices]
            self.composed[choices] = compose("config", overrides=overrides, return_hydra_config=True)
            self.jobs[choices] = copy.deepcopy(self.composed[choices])
            with open_dict(self.jobs[choices]):
                del self.jobs[choices]["hydra"]
        return choices, [o for o in parsed if not shapes_composition(o)]

    def sweeper_params(self, overrides: list[str]) -> DictConfig:
        return self.composed[self.choices(overrides)[0]].hydra.sweeper.params or {}

    def cell_problem(self, cell: tuple[str, ...]) -> Optional[str]:
        if cell not in self.cells:
            try:
                choices, values = self.choices(list(cell))
                cfg = copy.deepcopy(self.jobs[choices])
                ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
                validate(cfg, list(cell))  # the command line, as the CLI passes it
                self.cells[cell] = None
            except Exception as e:  # noqa: BLE001 - any error is the command's problem, reported with the others
                self.cells[cell] = message(e).splitlines()[0]  # the options Hydra lists after it are long
        return self.cells[cell]

    def problem(self, command: DocCommand) -> Optional[str]:
        """Why the command, or a cell of its sweep, does not compose and validate, or a tool's command does not
        parse (None: it does)."""
        if command.program in TOOLS:
            return parse_problem(TOOLS[command.program](), list(command.args))
        multirun, overrides = overrides_of(command)
        if not multirun:
            return self.cell_problem(tuple(overrides))
        try:
            cells = sweep_cells(overrides, self.sweeper_params(unswept(overrides)))
        except Exception as e:  # noqa: BLE001
            return message(e)
        return next((f"{' '.join(cell)}: {found}" for cell in cells if (found := self.cell_problem(tuple(cell)))), None)


def parse_problem(parser, args: list[str]) -> Optional[str]:
    """The argument parser's complaint about ``args`` (None: they parse)."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        return complaint.getvalue().strip().splitlines()[-1] if e.code else None  # --help exits 0
    return None


def message(error: Exception) -> str:
    return user_error_message(error) if isinstance(error, user_errors()) else f"{type(error).__name__}: {error}"


def as_on_a_gpu_machine(monkeypatch) -> None:
    """Validation's checks of the machine itself (a visible CUDA GPU, DeepSpeed installed) pass, as on the GPU
    machines the scale-out commands are written for: the commands are under test here, not this machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: ModuleSpec(name, None) if name == "deepspeed" else find_spec(name, *rest),
    )


def test_every_documented_command_composes_and_validates(tmp_path, monkeypatch):
    commands = documented_commands(tmp_path)
    assert len(commands) > 100, "the extraction found too few commands; has the docs' layout changed?"
    as_on_a_gpu_machine(monkeypatch)
    GlobalHydra.instance().clear()
    checker, failures = Checker(tmp_path), []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for command in commands:
                if any(name in command.text for name in GUIDE_ONLY):
                    continue
                found = checker.problem(command)
                if found:
                    failures.append(f"{command.where}: {command.text}\n    {found}")
    finally:
        GlobalHydra.instance().clear()
    assert not failures, f"{len(failures)} documented commands fail:\n" + "\n".join(failures)


def script_calls(script: str, tmp_path: Path, arguments: list[str]) -> list[DocCommand]:
    """The commands a sweep script runs, with its tools stood in for by recorders of their arguments."""
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ctxdistill", *TOOLS, "python"):  # each argument after a unit separator, each call ends a record
        recorder = f'#!/bin/sh\n{{ printf %s {tool}; for a in "$@"; do printf "\\037%s" "$a"; done; printf "\\036"; }}'
        (bin_dir / tool).write_text(f'{recorder} >> "{calls}"\n')
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SWEEP_DIR": str(tmp_path / "sweep")}
    subprocess.run(["bash", f"sweeps/{script}.sh", *arguments], cwd=ROOT, env=env, check=True)
    records = [record.split("\037") for record in calls.read_text().split("\036") if record]
    return [DocCommand(f"sweeps/{script}.sh", " ".join(r), tuple(r[1:]), program=r[0]) for r in records]


def test_the_learning_curves_sweep_runs_commands_that_compose_and_validate(tmp_path):
    """The figure and tables of docs/papers/beyond-the-window.md come from sweeps/beyond_window.sh, whose cells
    are built in the script, not written in a comment: every run, evaluation and the plot's command is checked."""
    commands = script_calls("beyond_window", tmp_path, ["logger=none", "trainer.eval_batch_size=8"])
    programs = [c.program for c in commands]
    assert programs.count("ctxdistill") == 8 and programs.count("ctxdistill-eval") == 5 and programs[-1] == "python"
    # the untrained baseline of the forgetting column runs under the sweep's overrides too (it had ignored them: a
    # sweep of another model compared its runs with SmolLM2's baseline)
    [before] = [c for c in commands if "method=zero_shot" in c.args]
    assert "trainer.eval_batch_size=8" in before.args
    GlobalHydra.instance().clear()
    checker, failures = Checker(tmp_path), []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for command in commands:
                if command.program == "python":
                    assert command.args[:2] == ("-m", "ctxdistill.learning_curve")
                    found = parse_problem(learning_curve_parser(), list(command.args[2:]))
                else:
                    found = checker.problem(command)
                if found:
                    failures.append(f"{command.text}\n    {found}")
    finally:
        GlobalHydra.instance().clear()
    assert not failures, "\n".join(failures)
