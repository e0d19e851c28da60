"""The commands and links of README.md and docs/*.md exist.

Every line of a fenced ```bash block is checked without running anything: a script it runs
(`bash tools/x.sh`, `python benchmarks/y.py`, `.venv/bin/python -P tools/z.py`) is a file of the
repository; `liif-cuda ...`, `python -m liif_cuda ...` and `torchrun ... -m liif_cuda ...` (or
`torchrun ... --no-python liif-cuda ...`) name a real
subcommand of `liif_cuda.cli.build_parser()` and only options that subcommand accepts (and a value among
its choices, or one its type parses, where the value is not a placeholder); a `LIIF_*` variable set
in front of a command is read somewhere in the repository; the command itself is one the documentation
is expected to use. `liif_cuda.X` names in ```python blocks exist, and relative links (with their
#anchors) point at files and headings that exist.
"""

import argparse
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT

import liif_cuda.cli

PAGES = ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md"))

PYTHONS = {"python", "python3", ".venv/bin/python"}
LIIF_CUDA = {"liif-cuda", ".venv/bin/liif-cuda"}
# Commands the documentation may use whose arguments are not checked here.
OTHER_COMMANDS = {"pip", "cmake", "ctest", "grep", "du", "ls", "cd", "git", "source", "export"}
OPERATORS = {"&&", "||", ";", "|"}


def fenced_blocks(text, language):
    """The contents of the ```language blocks of a markdown text, with their first line numbers."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None:
            if line.strip() == "```" + language:
                current, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, current))
            current = None
        else:
            current.append(line)
    return blocks


def command_lines(lines, first_number):
    """Logical command lines: backslash continuations joined; a line that starts with an option or a
    [bracketed] one continues the previous command (a synopsis spread over lines)."""
    commands = []
    pending = ""
    for number, line in enumerate(lines, first_number):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if pending:
            pending += " " + stripped
        elif commands and re.match(r"^(\[?--?\w|\.\.\.)", stripped):
            commands[-1] = (commands[-1][0], commands[-1][1] + " " + stripped)
            continue
        else:
            pending, start = stripped, number
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        commands.append((start, pending))
        pending = ""
    if pending:
        commands.append((start, pending))
    return commands


def simple_commands(line):
    """The words of each simple command of a shell line (comments dropped, split at && || ; |). A |
    between two words (`cpu|cuda`, a synopsis' alternatives) is kept inside the word."""
    line = re.sub(r"(?<=[^\s|])\|(?=[^\s|])", "\N{BROKEN BAR}", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, out = [], []
    for token in lexer:
        if token in OPERATORS:
            out.append(words)
            words = []
        else:
            words.append(token)
    out.append(words)
    return [w for w in out if w]


def is_placeholder(word):
    return any(c in word for c in "[]|<>\N{BROKEN BAR}") or word == "..." or word.isupper()


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def check_options(parser, words, where):
    """Every --option (and -o) among words exists in parser; a value given to an option with choices
    is one of them."""
    errors = []
    known = {s: a for a in parser._actions for s in a.option_strings}
    for i, word in enumerate(words):
        word = word.strip("[]")
        if not word.startswith("-") or word == "-" or re.match(r"^-\d", word):
            continue
        name = word.split("=", 1)[0]
        if name not in known:
            errors.append(f"{where}: {parser.prog} has no option {name}")
            continue
        action = known[name]
        value = word.split("=", 1)[1] if "=" in word else (
            words[i + 1] if i + 1 < len(words) and action.nargs != 0 else None)
        if value is None or value.startswith("-") or is_placeholder(value):
            continue
        if action.choices and value not in action.choices:
            errors.append(f"{where}: {parser.prog} {name} does not accept {value!r} "
                          f"(choices: {', '.join(map(str, action.choices))})")
        elif action.type is not None:
            try:  # int, float, or the command's own parser (--device's)
                action.type(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                errors.append(f"{where}: {parser.prog} {name} does not accept {value!r} ({exc})")
    return errors


def check_liif_cuda(args, where):
    """args: what follows `liif-cuda` (or `-m liif_cuda`)."""
    parser = liif_cuda.cli.build_parser()
    commands = subparsers(parser)
    for i, word in enumerate(args):
        if word.startswith("-"):
            continue
        if word not in commands:
            return [f"{where}: liif-cuda has no subcommand {word!r} (it has {', '.join(commands)})"]
        return check_options(parser, args[:i], where) + check_options(commands[word], args[i + 1:],
                                                                      where)
    return check_options(parser, args, where)


def check_path(path, where):
    if os.path.exists(os.path.join(ROOT, path)):
        return []
    return [f"{where}: {path} is not a file of the repository"]


def check_python(args, where):
    """args: what follows the Python interpreter."""
    i = 0
    while i < len(args) and args[i] in ("-P", "-u", "-B", "-O"):
        i += 1
    if i == len(args) or args[i] == "-c":
        return []
    if args[i] == "-m":
        module, rest = args[i + 1], args[i + 2:]
        if module == "liif_cuda":
            return check_liif_cuda(rest, where)
        if module == "pytest":
            return [e for w in rest if w.startswith("tests") for e in check_path(w.split("::")[0],
                                                                                 where)]
        try:
            importlib.util.find_spec(module)
        except ImportError:
            return [f"{where}: no module {module}"]
        return []
    return check_path(args[i], where)


def check_command(words, where):
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name = words[0].split("=", 1)[0]
        if name.startswith("LIIF_") and name not in repository_text():
            return [f"{where}: the variable {name} is read nowhere in the repository"]
        words = words[1:]
    if not words:
        return []
    command, args = words[0], words[1:]
    if command in ("bash", "sh"):
        return check_path(args[0], where) if args else [f"{where}: bash without a script"]
    if command in PYTHONS:
        return check_python(args, where)
    if command in LIIF_CUDA:
        return check_liif_cuda(args, where)
    if command == "torchrun":
        if "--no-python" in args:  # torchrun --no-python liif-cuda ...: the console script
            i = next((j for j, a in enumerate(args) if a in LIIF_CUDA), None)
            return (check_liif_cuda(args[i + 1:], where) if i is not None else
                    [f"{where}: torchrun --no-python without liif-cuda"])
        if "-m" not in args:
            script = next((a for a in args if a.endswith(".py")), None)
            return (check_path(script, where) if script is not None else
                    [f"{where}: torchrun without a script, -m or --no-python"])
        i = args.index("-m")
        return check_python(args[i:], where)
    if command in (".venv/bin/pytest", "pytest"):
        return [e for w in args if w.startswith("tests") for e in check_path(w.split("::")[0], where)]
    if command in OTHER_COMMANDS:
        return []
    return [f"{where}: unexpected command {command!r}"]


_TEXT = []


def repository_text():
    """The repository's code (scripts, package, setup, benchmarks), for variable names."""
    if not _TEXT:
        parts = []
        for folder in ("liif_cuda", "tools", "benchmarks", "csrc", ".ci"):
            for base, _, files in os.walk(os.path.join(ROOT, folder)):
                for name in files:
                    if name.endswith((".py", ".sh", ".cpp", ".h", ".cuh", ".cu")) or name == "run":
                        with open(os.path.join(base, name), errors="replace") as f:
                            parts.append(f.read())
        with open(os.path.join(ROOT, "setup.py")) as f:
            parts.append(f.read())
        _TEXT.append("\n".join(parts))
    return _TEXT[0]


def check_bash_text(text, page):
    errors = []
    for start, lines in fenced_blocks(text, "bash"):
        for number, line in command_lines(lines, start):
            for words in simple_commands(line):
                errors += check_command(words, f"{page}:{number}")
    return errors


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_bash_commands_exist(page):
    errors = check_bash_text(read(page), page)
    assert not errors, "\n".join(errors)


def test_readme_has_commands():
    blocks = fenced_blocks(read("README.md"), "bash")
    assert len(blocks) >= 5
    text = "\n".join(line for _, lines in blocks for line in lines)
    for command in ("bash tools/quickstart.sh", "bash tools/setup_and_test.sh", "liif-cuda upscale",
                    "liif-cuda train", "liif-cuda eval", "LIIF_CUDA_TORCH=cpu"):
        assert command in text


@pytest.mark.parametrize("line, message", [
    ("bash tools/quikstart.sh", "not a file"),
    ("liif-cuda upscal photo.jpg -o x.png --scale 2", "no subcommand"),
    ("liif-cuda upscale photo.jpg -o x.png --scael 2", "no option --scael"),
    ("liif-cuda upscale a.png -o b.png --scale 2 --precision bf61", "does not accept"),
    ("torchrun --nproc_per_node 4 -m liif_cuda train --config rdn-liif --outt runs/x", "no option"),
    ("torchrun --nproc_per_node 4 --no-python liif-cuda trian --config x", "no subcommand"),
    ("torchrun --nproc_per_node 4 --no-python liif-cuda train --ouT runs/x", "no option --ouT"),
    ("torchrun --nproc_per_node 4 --no-python liif_cuda train", "without liif-cuda"),
    ("python -m liif_cuda eval --data Set5 --protocol mmedti", "does not accept"),
    ("liif-cuda upscale a.png -o b.png --scale 2 --device gpu", "--device does not accept 'gpu'"),
    ("liif-cuda upscale a.png -o b.png --scale 2x", "--scale does not accept '2x'"),
    ("liif-cuda train --config x --out y --workers two", "--workers does not accept"),
    (".venv/bin/python -P benchmarks/bench_qeury.py", "not a file"),
    ("LIIF_CUDA_TOCH=cpu bash tools/setup_env.sh", "read nowhere"),
    ("liif-cdua --version", "unexpected command"),
    ("cd /tmp && liif-cuda --versoin", "no option --versoin"),
])
def test_a_typo_fails(line, message):
    errors = check_bash_text(f"```bash\n{line}\n```\n", "example")
    assert any(message in e for e in errors), errors


def python_names(text):
    names = set()
    for _, lines in fenced_blocks(text, "python"):
        for line in lines:
            names.update(re.findall(r"\bliif_cuda((?:\.[A-Za-z_]\w*)+)", line))
    return names


def resolve(dotted):
    obj = importlib.import_module("liif_cuda")
    path = "liif_cuda"
    for part in dotted.strip(".").split("."):
        path += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(path)
    return obj


@pytest.mark.parametrize("page", PAGES)
def test_python_names_exist(page):
    missing = []
    for dotted in sorted(python_names(read(page))):
        try:
            resolve(dotted)
        except ImportError:
            missing.append("liif_cuda" + dotted)
    assert not missing, f"{page}: {missing}"


def slug(heading):
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_exist(page):
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    errors = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, file)):
            errors.append(f"{page}: link to {target}: no file {file}")
        elif anchor and file.endswith(".md") and anchor not in anchors(file):
            errors.append(f"{page}: link to {target}: no heading #{anchor} in {file}")
    assert not errors, "\n".join(errors)
