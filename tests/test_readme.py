"""The README and docs/ cannot rot: their commands name real scripts, Make targets, flags and
config fields, their relative links resolve, and the README stays a page a newcomer reads.

Everything is checked from the sources (ast, the config files' `get_config()`), so no network is
built and no entry script runs. A command is any `python ...`, `torchrun ...` or `make ...` line
of a shell code block, or an inline code span that starts with one of these; `...` stands for
elided arguments and `[--flag value]` for an optional one, both as the docs write them.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 320
# Flags absl defines for every program (app.run / define_help_flags).
ABSL_BUILTIN_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"}
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
LAUNCHERS = ("python", "python3", "torchrun")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- Markdown parsing ------------------------------------------------------------------------

def _split_markdown(text: str) -> tuple[list[tuple[int, str, list[str]]], list[tuple[int, str]]]:
    """Fenced code blocks as (first line number, language, lines) and the other lines as
    (line number, text), HTML comments blanked."""
    blocks, prose = [], []
    block = None
    in_comment = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if block is None and stripped.startswith("```"):
            block = (number + 1, stripped[3:].strip().lower(), [])
            continue
        if block is not None:
            if stripped.startswith("```"):
                blocks.append(block)
                block = None
            else:
                block[2].append(line)
            continue
        kept = ""
        rest = line
        while rest:
            if in_comment:
                end = rest.find("-->")
                if end < 0:
                    rest = ""
                else:
                    in_comment, rest = False, rest[end + 3:]
            else:
                start = rest.find("<!--")
                if start < 0:
                    kept, rest = kept + rest, ""
                else:
                    kept, rest, in_comment = kept + rest[:start], rest[start + 4:], True
        prose.append((number, kept))
    return blocks, prose


def _shell_lines(block_start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Logical lines of a shell block (backslash continuations joined), with line numbers."""
    joined, start, parts = [], None, []
    for offset, line in enumerate(lines):
        if start is None:
            start = block_start + offset
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def _split_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line (comments dropped, split at ; && || |)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def _commands(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, source text, words) of every project command in a Markdown file."""
    blocks, prose = _split_markdown(path.read_text())
    found = []
    for start, language, lines in blocks:
        if language not in SHELL_LANGUAGES:
            continue
        for number, line in _shell_lines(start, lines):
            for words in _split_commands(line):
                found.append((number, line.strip(), words))
    # Inline code spans that are commands (they may wrap over a line break).
    numbers = [number for number, _ in prose]
    text = "\n".join(line for _, line in prose)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(match.group(1).split())
        if not span.startswith(tuple(f"{word} " for word in (*LAUNCHERS, "make"))):
            continue
        number = numbers[text.count("\n", 0, match.start())]
        try:
            commands = _split_commands(span)
        except ValueError:
            continue
        found.extend((number, span, words) for words in commands)
    return found


# --- What exists ------------------------------------------------------------------------------

@functools.cache
def _makefile_targets() -> dict[str, list[str]]:
    """Make targets with the lines of their recipes."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*:(?!=)", line)
        if match:
            current = match.group(1)
            targets.setdefault(current, [])
        elif line.startswith("\t") and current is not None:
            targets[current].append(line.strip())
        else:
            current = None
    return targets


@functools.cache
def _flags_of(script: Path) -> tuple[frozenset[str], frozenset[str], str | None]:
    """(flag names, boolean flag names, default config path) defined by a script: absl
    `DEFINE_*("name", ...)` and argparse `add_argument("--name", ...)` calls, in the script and
    in the project modules it imports."""
    names, booleans, default_config = set(), set(), None
    sources = [script]
    tree = ast.parse(script.read_text(), filename=str(script))
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        for module in modules:
            candidate = ROOT / (module.replace(".", "/") + ".py")
            if candidate.is_file() and candidate != script:
                sources.append(candidate)
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if not isinstance(node, ast.Call):
                continue
            func = getattr(node.func, "attr", getattr(node.func, "id", ""))
            args = [a.value for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            first = node.args[0] if node.args else None
            # absl's flags.DEFINE_*, config_flags.DEFINE_config_file and project wrappers
            # named like them (cli.define_config_file).
            if func.lower().startswith("define_") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                names.add(first.value)
                if func.lower() in ("define_bool", "define_boolean"):
                    booleans.add(first.value)
                if func.lower().endswith("config_file") and source == script \
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    default_config = node.args[1].value
            elif func == "add_argument":
                names.update(a[2:] for a in args if a.startswith("--"))
    return frozenset(names), frozenset(booleans), default_config


@functools.cache
def _config(path: str):
    """`get_config()` of a config file (configs import nothing but ml_collections)."""
    spec = importlib.util.spec_from_file_location(f"_readme_config_{abs(hash(path))}",
                                                  ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            if part not in node:
                return False
            node = node[part]
        except TypeError:  # a leaf value, not a section
            return False
    return True


# --- Checking one command ---------------------------------------------------------------------

def _clean(words: list[str]) -> list[str]:
    """Words without the optional-argument brackets and the `...` ellipses of the docs."""
    cleaned = []
    for word in words:
        word = word.strip("[]")
        if word and word != "..." and not (word.startswith("[") and word.endswith("]")):
            cleaned.append(word)
    return cleaned


def _option_value(args: list[str], name: str) -> str | None:
    for i, word in enumerate(args):
        if word == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
    return None


def _check_flags(script: Path, args: list[str], elided: bool) -> list[str]:
    """Problems with the flags `args` pass to `script`."""
    names, booleans, default_config = _flags_of(script)
    problems = []
    config_path = _option_value(args, "config")
    if config_path is None and "config" not in [w[2:].split("=")[0] for w in args]:
        config_path = default_config
    for word in args:
        if not word.startswith("--") or word == "--":
            continue
        name = word[2:].split("=", 1)[0]
        if name.startswith("config."):
            if "config" not in names:
                problems.append(f"{_rel(script)} has no --config flag for {word}")
                continue
            if config_path is None or (elided and _option_value(args, "config") is None):
                continue  # the config is elided: nothing to check the field against
            config_file = config_path.split(":", 1)[0]
            if not config_file.endswith(".py"):
                continue  # a placeholder such as C
            if not (ROOT / config_file).is_file():
                continue  # reported below
            if not _has_field(_config(config_file), name[len("config."):]):
                problems.append(f"{config_file} has no field {name[len('config.'):]}")
        elif name in names or name in ABSL_BUILTIN_FLAGS or (
                name.startswith("no") and name[2:] in booleans):
            continue
        else:
            problems.append(f"{_rel(script)} defines no flag --{name}")
    if config_path and config_path.split(":", 1)[0].endswith(".py") \
            and not (ROOT / config_path.split(":", 1)[0]).is_file():
        problems.append(f"config file {config_path} does not exist")
    return problems


def _check_command(words: list[str]) -> list[str]:
    """Problems with one command; commands that run no project script are not checked."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # environment assignments
    if not words:
        return []
    program = Path(words[0]).name
    elided = "..." in words
    if program == "make":
        targets = _makefile_targets()
        problems = []
        for word in _clean(words[1:]):
            if word.startswith("-"):
                continue
            if "=" in word:
                variable, value = word.split("=", 1)
                if not variable.endswith("_ARGS"):
                    continue
                scripts = {m for target in words[1:] if target in targets
                           for line in targets[target] for m in re.findall(r"\S+\.py", line)}
                for script in scripts:
                    problems += _check_flags(ROOT / script, shlex.split(value), elided)
            elif word not in targets:
                problems.append(f"the Makefile has no target {word}")
        return problems
    if program not in LAUNCHERS and not re.fullmatch(r"python3?(\.\d+)?", program):
        return []
    args = _clean(words[1:])
    if "-c" in args[:1]:
        return []
    if "-m" in args[:1]:
        if len(args) < 2:
            return ["python -m without a module"]
        module = args[1]
        if "*" in module:  # a family of modules, e.g. analysis.*
            pattern = module.replace(".", "/") + ".py"
            return [] if any(ROOT.glob(pattern)) else [f"python -m {module}: no module matches"]
        candidates = [ROOT / (module.replace(".", "/") + ".py"),
                      ROOT / module.replace(".", "/") / "__main__.py"]
        script = next((c for c in candidates if c.is_file()), None)
        top = ROOT / module.split(".")[0]
        if script is None:
            if top.is_dir() or (ROOT / (module.split(".")[0] + ".py")).is_file():
                return [f"python -m {module}: no such module in the project"]
            return []  # a third-party module such as pytest
        return _check_flags(script, args[2:], elided)
    for i, word in enumerate(args):
        if word.endswith(".py"):
            script = ROOT / word
            if not script.is_file():
                return [f"script {word} does not exist"]
            return _check_flags(script, args[i + 1:], elided)
    return []


# --- Tests ------------------------------------------------------------------------------------

def _report(path: Path, number: int, source: str, problems: list[str]) -> str:
    return f"{_rel(path)}:{number}: {'; '.join(problems)}\n    {source}"


@pytest.mark.parametrize("path", [README, *DOC_FILES], ids=lambda p: _rel(p))
def test_commands_name_existing_scripts_flags_and_config_fields(path):
    failures = []
    for number, source, words in _commands(path):
        problems = _check_command(words)
        if problems:
            failures.append(_report(path, number, source, problems))
    assert not failures, "Commands that would not run as written:\n" + "\n".join(failures)


def test_readme_has_the_newcomer_commands():
    """The README runs a project command at all (guards the parser against finding nothing),
    and its first 100 lines reach a subspace sample of the committed demo checkpoints."""
    commands = _commands(README)
    scripts = {w for _, _, words in commands for w in words if w.endswith(".py")}
    assert {"main.py", "subspace_sample.py"} <= scripts, scripts
    early = [words for number, _, words in commands if number <= 100]
    assert any("subspace_sample.py" in words
               and any("assets/checkpoints/builtin" in w for w in words)
               or words[:2] == ["make", "demo-quick"] for words in early), \
        "no subspace sample of the committed demo checkpoints in the README's first 100 lines"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    _, prose = _split_markdown(path.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return frozenset(anchors)


def _broken_links(path: Path) -> list[str]:
    """One line per relative link of a Markdown file whose file or heading anchor is missing."""
    _, prose = _split_markdown(path.read_text())
    failures = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                failures.append(f"{path.name}:{number}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                failures.append(f"{path.name}:{number}: {target}: no heading with anchor "
                                f"#{anchor} in {linked.name}")
    return failures


@pytest.mark.parametrize("path", [README, *DOC_FILES], ids=lambda p: _rel(p))
def test_relative_links_resolve(path):
    failures = _broken_links(path)
    assert not failures, "Broken links:\n" + "\n".join(failures)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, more than {MAX_README_LINES}: move the evidence to "
        f"a docs/ page and link it (line {MAX_README_LINES + 1}: {lines[MAX_README_LINES]!r})")


# --- The checker itself -----------------------------------------------------------------------

def test_checker_reports_unknown_scripts_flags_fields_and_targets():
    assert _check_command(["python", "nonexistent_script.py"]) == [
        "script nonexistent_script.py does not exist"]
    assert _check_command(["python", "main.py", "--no_such_flag", "1"]) == [
        "main.py defines no flag --no_such_flag"]
    assert _check_command(["python", "main.py", "--config",
                           "configs/subvp/cifar10_ddpmpp_continuous.py",
                           "--config.sampling.no_such_field", "1"]) == [
        "configs/subvp/cifar10_ddpmpp_continuous.py has no field sampling.no_such_field"]
    assert _check_command(["make", "no-such-target"]) == [
        "the Makefile has no target no-such-target"]
    assert _check_command(["make", "demo", "DEMO_ARGS=--threads 1 --bogus"]) == [
        "demo.py defines no flag --bogus"]
    assert _check_command(["python", "-m", "analysis.nothing"]) == [
        "python -m analysis.nothing: no such module in the project"]
    assert _check_command(["python", "bench/bench_samplers.py", "--out", "d", "--nope"]) == [
        "bench/bench_samplers.py defines no flag --nope"]


def test_checker_accepts_real_commands():
    assert _check_command(["python", "main.py", "--config",
                           "configs/subvp/cifar10_ddpmpp_continuous.py", "--mode", "train",
                           "--workdir", "w", "--config.data.image_size", "16",
                           "--config.eval.enable_loss=False", "--nosnapshot_sampling"]) == []
    # subspace_sample.py's default --config is the VE CIFAR-10 one.
    assert _check_command(["python", "subspace_sample.py", "--config.sampling.snr", "0.1"]) == []
    assert _check_command(["torchrun", "--standalone", "--nproc_per_node=4", "main.py",
                           "--mode", "train"]) == []
    assert _check_command(["python", "-m", "pytest", "-q", "--whatever"]) == []
    assert _split_commands("make venv && . .venv/bin/activate  # set up") == [
        ["make", "venv"], [".", ".venv/bin/activate"]]


def test_link_checker_finds_missing_files_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title, with `code`!\n\n[ok](#a-title-with-code) [bad](#nope) "
                    "[gone](missing.md) [web](https://example.org/x)\n")
    assert _anchors(page) == frozenset({"a-title-with-code"})
    assert _broken_links(page) == [
        "page.md:3: #nope: no heading with anchor #nope in page.md",
        "page.md:3: missing.md does not exist"]
    assert _slug("Why the subspace samplers scored 1.3x worse") == \
        "why-the-subspace-samplers-scored-13x-worse"
