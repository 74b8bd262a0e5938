"""The README's commands stay true: every train/sample/evaluate command in it parses with the
scripts' real argument parsers (so a renamed or dropped flag fails here), and the small ones run.
The full-size ones (ImageNet, 8 GPUs) are run at small size by the other tests and `make demo`."""

import os
import re
import shlex

import pytest

import evaluate_fid
import sample
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"train.py": train, "sample.py": sample, "evaluate_fid.py": evaluate_fid}


def readme_commands():
    """Shell commands in the README's bash blocks, continuation lines joined, comments dropped."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip() if not line.startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def script_commands():
    found = []
    for command in readme_commands():
        words = shlex.split(command.replace("<run>", "run"))
        scripts = [i for i, w in enumerate(words) if w in PARSERS]
        if scripts:
            i = scripts[0]
            found.append((words[i], words[i + 1 :]))
    return found


def test_readme_has_the_commands_users_need():
    names = [name for name, _ in script_commands()]
    assert names.count("train.py") >= 3 and names.count("sample.py") >= 3
    assert names.count("evaluate_fid.py") >= 3
    assert readme_commands()[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("script,argv", script_commands(), ids=lambda v: str(v)[:40])
def test_readme_command_parses(script, argv):
    args = PARSERS[script].build_parser().parse_args(argv)
    assert args is not None


def test_every_test_named_in_the_readme_exists():
    """The guarantees table names the test behind each line; a renamed test fails here."""
    import ast

    with open(os.path.join(REPO, "README.md")) as f:
        named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", f.read()))
    assert len(named) >= 10
    for path, name in named:
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"{path}::{name}"
