"""README.md's commands: every training example parses, no two examples (nor two commands of the recipes'
headers) share a run directory, and those whose files are here pass the pre-flight; the quick start itself
runs in tests/test_demo.py, the audit commands in tests/test_audit.py."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dreamprm import cli, preflight
from dreamprm.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[tuple[int, list[str]]]:
    """(line, argv) of every command in the README's bash blocks: continuation lines joined, `a && b`
    split, comments dropped, environment assignments in front dropped."""
    out, block, lineno, pending = [], False, 0, ""
    for i, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            lineno = i
        pending += line.rstrip("\\") + " "
        if line.endswith("\\"):
            continue
        for part in pending.split("&&"):
            argv = shlex.split(part, comments=True)
            while argv and "=" in argv[0] and not argv[0].startswith("-"):
                argv = argv[1:]
            if argv:
                out.append((lineno, argv))
        pending = ""
    return out


def training_args(argv: list[str]) -> list[str] | None:
    """The trainer's flags of a launch/train.py or `dreamprm train` command, else None."""
    if "launch/train.py" in argv:
        return argv[argv.index("launch/train.py") + 1:]
    if argv[:2] == ["dreamprm", "train"]:
        return argv[2:]
    return None


def ranks(argv: list[str]) -> str:
    for flag in ("--num_gpus", "--nproc_per_node"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return "1"


TRAINING = [(n, a, ranks(argv)) for n, argv in commands()
            if (a := training_args(argv)) is not None and "--help" not in a]
QUIET = ("disable_wandb", "wandb_mode", "experiment_name", "project_name")  # not part of what a run trains


def test_the_readme_has_its_training_examples():
    assert len(TRAINING) >= 10


@pytest.mark.parametrize("line,args,_ranks", TRAINING, ids=[f"README.md:{n}" for n, _, _ in TRAINING])
def test_every_training_example_is_a_valid_config(line, args, _ranks):
    _, problems, _ = parse_config(args)
    assert problems == [], f"README.md:{line}: {problems}"


def test_no_two_training_examples_share_a_run_directory():
    """Two examples in one directory: the second resumes (or refuses) the first, and a checkpoint resumes
    only with its own settings. Only the same run (same config and ranks) may appear twice (the 2-rank demo
    in Quick start and in Launching)."""
    seen = {}
    for line, args, world in TRAINING:
        cfg, _, _ = parse_config(args)
        what = cfg.to_dict()
        for k in QUIET:
            what["run"].pop(k)
        other_line, other = seen.setdefault(cfg.run.output_dir, (line, (what, world)))
        assert other == (what, world), f"README.md:{line} and README.md:{other_line} share {cfg.run.output_dir}"


def recipe_header_commands() -> list[tuple[str, list[str], str]]:
    """(recipe:line, trainer flags, ranks) of the commands in the recipes' header comments (`#   torchrun ...`)."""
    out = []
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        for i, line in enumerate(recipe.read_text().splitlines(), 1):
            if not line.startswith(("#   python ", "#   torchrun ", "#   deepspeed ")):
                continue
            argv = shlex.split(line[1:], comments=True)
            if (a := training_args(argv)) is not None:
                out.append((f"recipes/{recipe.name}:{i}", a, ranks(argv)))
    return out


def test_no_two_recipe_header_commands_share_a_run_directory():
    """As for the README: a recipe's 1-rank smoke and its 2-rank one in one directory would make the second
    resume (or refuse) the first."""
    found, seen = recipe_header_commands(), {}
    assert len(found) >= 6
    for where, args, world in found:
        cfg, problems, _ = parse_config(args)
        assert problems == [], f"{where}: {problems}"
        what = cfg.to_dict()
        for k in QUIET:
            what["run"].pop(k)
        other_where, other = seen.setdefault(cfg.run.output_dir, (where, (what, world)))
        assert other == (what, world), f"{where} and {other_where} share {cfg.run.output_dir}"


def test_the_examples_whose_files_are_here_pass_the_preflight():
    """Every file they name exists next to this checkout (the recipes' ../shared/realdata): the preflight
    (files, records, DeepSpeed JSON) passes, as `launch/train.py` would check before building a model."""
    ran = 0
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for _line, args, world in TRAINING:
            cfg, problems, _ = parse_config(args)
            if preflight.path_problems(cfg, int(world)):  # placeholder files (a.jsonl), or a 7B model folder
                continue
            preflight.check(cfg, problems, world=int(world), check_machine=False)
            ran += 1
    finally:
        os.chdir(cwd)
    assert ran >= (6 if (ROOT / "../shared/realdata").is_dir() else 4)  # the demo ones; the mix ones with the data


def test_the_other_dreamprm_commands_parse():
    """Every `dreamprm ...` command's flags are the CLI's (argparse exits 2 on a wrong one)."""
    parser = cli.build_parser()
    n = 0
    for _line, argv in commands():
        if argv[0] != "dreamprm" or argv[1] == "train":
            continue
        parser.parse_args(argv[1:])
        n += 1
    assert n >= 10


def test_dreamprm_train_help_is_launch_train_help():
    a = subprocess.run([sys.executable, "-m", "dreamprm.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    b = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "--epochs" in a.stdout


def test_the_module_map_names_every_module_of_the_package():
    """"Where things live" must name each file of dreamprm/ (a new module gets its line, a removed one loses it)."""
    section = README.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    pkg = ROOT / "dreamprm"
    missing = []
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg)
        if p.name == "__init__.py" or rel.parts[0] == "demo":
            continue
        named = (f"`{p.name}`" in section or f"{p.stem}.py" in section or f"dreamprm/{rel.as_posix()}" in section)
        if not named:
            missing.append(rel.as_posix())
    assert not missing, f"README 'Where things live' does not name {missing}"
    for name in section.split("`"):
        if name.startswith("dreamprm/") and name.endswith(".py"):
            assert (ROOT / name).is_file(), f"README 'Where things live' names {name}, which does not exist"
