"""README and docs/ stay true: every command they show (in bash blocks, and `python ...` in
running text) parses with the real argument parser of the script or module it names, so a
renamed or dropped flag fails here; the tests they name exist; README's snippet runs as
written. The full-size commands (ImageNet, 8 GPUs) run at small size in the other tests."""

import argparse
import ast
import contextlib
import glob
import importlib
import io
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
SCRIPTS = {  # what a command names -> the module whose main() parses its flags
    "train.py": "train",
    "sample.py": "sample",
    "evaluate_fid.py": "evaluate_fid",
    "train_classifier.py": "train_classifier",
    "scripts/slurm/train.sbatch": "train",
    "scripts/slurm/evaluate.sbatch": "evaluate_fid",
}


def read(page: str) -> str:
    with open(os.path.join(REPO, page)) as f:
        return f.read()


def shown_commands(page: str) -> list[str]:
    """The page's shell commands: bash-block lines (continuations joined, comments dropped) and
    `python ...` code spans in the text."""
    text = read(page)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("#", 1)[0].strip() if not line.startswith("#") else ""
            if line:
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`(python [^`]+)`", prose)]
    return commands


def parsed_commands():
    """(page, module, argv) of every command that runs one of the project's parsers."""
    found = []
    for page in PAGES:
        for command in shown_commands(page):
            words = shlex.split(command.replace("<run>", "run"))
            for i, word in enumerate(words):
                if word in SCRIPTS:
                    found.append((page, SCRIPTS[word], words[i + 1 :]))
                    break
                if word == "-m" and i + 1 < len(words):
                    name = words[i + 1]
                    if name.split(".")[0] in ("bench", "experiments", "models"):
                        module = f"{name}.__main__" if name == "models" else name
                        found.append((page, module, words[i + 2 :]))
                    break
    return found


class Parsed(Exception):
    """Raised in place of running a command once its flags have parsed."""


@pytest.mark.parametrize(
    "page,module,argv", parsed_commands(), ids=lambda v: str(v)[:40] if isinstance(v, str) else ""
)
def test_every_command_shown_parses(monkeypatch, page, module, argv):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        importlib.import_module(module).main(argv)


def test_readme_has_the_commands_users_need_in_its_first_150_lines():
    readme = read("README.md")
    commands = shown_commands("README.md")
    assert commands[:2] == ["make demo", "make test"]
    scripts = [module for page, module, _ in parsed_commands() if page == "README.md"]
    assert scripts.count("train") >= 3 and scripts.count("sample") >= 2
    assert scripts.count("evaluate_fid") >= 2
    head = "\n".join(readme.splitlines()[:150])
    answers = ["DiT-XL-2-256x256.pt", "--cfg-channels 3", "VIRTUAL_imagenet256_labeled.npz",
               "--resume", "--keep-checkpoints 0", "A100", "VisualContrastAttention"]  # fmt: skip
    for answer in answers:
        assert answer in head, answer
    assert len(readme.splitlines()) <= 300


def test_every_test_a_page_names_exists():
    """Pages name the test behind a claim; a renamed or removed test fails here."""
    named = {
        found
        for page in PAGES
        for found in re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", read(page))
    }
    assert len(named) >= 10
    for path, name in named:
        tree = ast.parse(read(path))
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"{path}::{name}"


def test_every_page_linked_from_the_readme_exists():
    for link in re.findall(r"\]\(((?:docs/)?[\w/.-]+\.(?:md|png))\)", read("README.md")):
        assert os.path.exists(os.path.join(REPO, link)), link


def test_the_readme_snippet_puts_vca_into_a_vit_block_as_written():
    """The "VCA in your own model" block runs exactly as README shows it, and what it prints
    is the shape of the tokens it was given."""
    section = read("README.md").split("## VCA in your own model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    printed = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert printed.getvalue().strip() == "torch.Size([2, 197, 192])"
    block = namespace["Block"]()
    assert type(block.attn).__name__ == "VisualContrastAttention"
    assert block.attn.prefix_tokens == 1 and block.attn.contrast_grid == (7, 7)
