"""The commands and Python calls that the README and docs/ show exist and take the keys they are shown
with: a renamed key or command must not leave a documented line that fails with 'unknown key'.

Values are not checked (the docs use placeholders such as `model=M`); only command names and keys are.
"""

import ast
import dataclasses
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

import dinokit
from dinokit.cli import COMMANDS, FURTHER_KEYS, split_command
from dinokit.errors import DinokitError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a Markdown file."""
    return [(m[1], m[2]) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


def shell_commands(text: str) -> list[str]:
    """The logical lines of a shell block (backslash continuations joined)."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def dinokit_argv(line: str) -> list[str] | None:
    """The words after `dinokit` (or `python -m dinokit`) on a shell line, comments dropped; None if
    the line runs no dinokit command or shows a template such as `dinokit <command> ...`."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote inside prose-like text: not a command line
        return None
    for i, word in enumerate(words):
        if Path(word).name == "dinokit" and (i == 0 or words[i - 1] in ("-m", "exec") or "=" in words[i - 1]):
            argv = words[i + 1 :]
            if not argv or argv[0].startswith(("<", "-")) or argv[0] in ("...",):
                return None
            return argv
    return None


def documented_command_lines() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for language, text in code_blocks(path):
            if language in ("", "bash", "sh", "shell", "console"):
                variables = {}  # NAME="..." lines of the block, expanded in the lines after them
                for line in shell_commands(text):
                    assignment = re.fullmatch(r"(\w+)=(.*)", line)
                    if assignment:
                        variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
                    for name, value in variables.items():
                        line = re.sub(rf"\$\{{?{name}\b\}}?", value, line)
                    if dinokit_argv(line) is not None:
                        found.append((f"{path.name}: {line}", line))
    return found


def command_keys(name: str) -> set[str]:
    """The keys `dinokit <name>` accepts: its function's keyword arguments, plus the config fields of
    the commands that pass further keys on (pretrain, finetune)."""
    module, func = COMMANDS[name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
    keys = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} | {"config"}
    if name in FURTHER_KEYS:
        module, cls = FURTHER_KEYS[name].split(":")
        keys |= {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    return keys


COMMAND_LINES = documented_command_lines()


def test_the_docs_show_commands():
    """The collection above finds the documented commands (a broken parser would pass every test)."""
    names = {split_command(dinokit_argv(line))[0] for _, line in COMMAND_LINES}
    assert {"pretrain", "embed", "eval knn", "index build", "visualize pca", "export"} <= names, names
    assert len(COMMAND_LINES) >= 40, len(COMMAND_LINES)


def command_line_problems(line: str) -> list[str]:
    """What is wrong with a documented `dinokit ...` line: an unknown command, a word that is not
    key=value, keys the command does not take."""
    try:
        name, rest = split_command(dinokit_argv(line))
    except DinokitError as e:  # no such command
        return [str(e)]
    if "--help" in rest:
        return []
    keys, problems = command_keys(name), []
    for pair in (word for word in rest if word != "..."):  # `...`: the keys shown elsewhere
        key = pair.split("=", 1)[0].replace("-", "_")
        if "=" not in pair:
            problems.append(f"{pair!r} is not key=value")
        elif key not in keys:
            problems.append(f"`dinokit {name}` has no key {key!r}")
    return problems


def test_the_check_finds_a_wrong_command_or_key():
    assert command_line_problems("dinokit eval knn model=M train=a val=b out=c k=20") == [
        "`dinokit eval knn` has no key 'k'"
    ]
    assert command_line_problems("torchrun --nproc_per_node 2 -m dinokit pretrain data=d lr=1e-3 ... # x") == []
    assert command_line_problems("dinokit pretrain data=d lrr=1") == ["`dinokit pretrain` has no key 'lrr'"]
    assert command_line_problems("dinokit evaluate knn model=M")[0].startswith("unknown command 'evaluate knn'")


@pytest.mark.parametrize("where, line", COMMAND_LINES, ids=[w[:90] for w, _ in COMMAND_LINES])
def test_every_documented_command_line_names_a_command_and_its_keys(where, line):
    assert not command_line_problems(line), f"{where}: {command_line_problems(line)}"


def inline_command_lines() -> list[tuple[str, str]]:
    """The `dinokit ...` code spans of the docs' prose (outside fenced blocks), leaving out those that
    name a group of commands alone (`dinokit eval`) or several at once (`dinokit eval segmentation|depth`)."""
    found = []
    groups = {name.rsplit(" ", 1)[0] for name in COMMANDS if " " in name}
    for path in DOCS:
        prose = FENCE.sub("", path.read_text(encoding="utf-8"))
        for span in re.findall(r"`([^`\n]*\bdinokit [^`\n]*)`", prose):
            argv = dinokit_argv(span)
            if argv is None or "|" in span or " ".join(argv) in groups:
                continue
            found.append((f"{path.name}: {span}", span))
    return found


INLINE_LINES = inline_command_lines()


def test_the_docs_prose_shows_commands():
    assert len(INLINE_LINES) >= 20, len(INLINE_LINES)
    assert command_line_problems("dinokit info dinov2_vits14") == ["'dinov2_vits14' is not key=value"]


@pytest.mark.parametrize("where, line", INLINE_LINES, ids=[w[:90] for w, _ in INLINE_LINES])
def test_every_command_in_the_docs_prose_names_a_command_and_its_keys(where, line):
    """`dinokit info dinov2_vits14` (no model=) stood in docs/reproducing.md's prose, which the fenced-block
    check above does not read."""
    assert not command_line_problems(line), f"{where}: {command_line_problems(line)}"


def dinokit_calls(tree: ast.AST, aliases: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(dotted name, keyword names) of every call of a dinokit function in `tree`; `aliases` maps the
    names a block imported (`from dinokit.x import f`, `import dinokit as dk`) to their dotted path."""
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, func = [], node.func
        while isinstance(func, ast.Attribute):
            parts.insert(0, func.attr)
            func = func.value
        if isinstance(func, ast.Name) and func.id in aliases:
            calls.append((".".join([aliases[func.id], *parts]), [k.arg for k in node.keywords if k.arg]))
    return calls


def python_aliases(tree: ast.AST) -> dict[str, str]:
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "dinokit"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dinokit":
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    return aliases


def resolve(dotted: str):
    """The object a dotted name such as dinokit.eval.knn.knn_classify names (None for a method of a
    returned object, which this check cannot follow)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def documented_python_calls() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in DOCS:
        for language, text in code_blocks(path):
            if language != "python":
                continue
            tree = ast.parse(text)
            for dotted, keywords in dinokit_calls(tree, {"dinokit": "dinokit", **python_aliases(tree)}):
                found.append((f"{path.name}: {dotted}", dotted, keywords))
    return found


PYTHON_CALLS = documented_python_calls()


@pytest.mark.parametrize("where, dotted, keywords", PYTHON_CALLS, ids=[w[:90] for w, _, _ in PYTHON_CALLS])
def test_every_documented_python_call_exists_with_its_keywords(where, dotted, keywords):
    obj = resolve(dotted)
    assert obj is not None, f"{where}: {dotted} does not exist"
    if not callable(obj) or not keywords:
        return
    params = inspect.signature(obj).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # further keys: a command's config fields
        command = next((c for c, target in COMMANDS.items() if resolve(target.replace(":", ".")) is obj), None)
        if command not in FURTHER_KEYS:
            return
        allowed = command_keys(command)
    else:
        allowed = set(params)
    unknown = sorted(set(keywords) - allowed)
    assert not unknown, f"{where}: no keyword(s) {unknown}"


def test_the_docs_show_python_calls():
    assert len(PYTHON_CALLS) >= 20, len(PYTHON_CALLS)
    assert any(dotted == "dinokit.load_model" for _, dotted, _ in PYTHON_CALLS)
    assert dinokit.load_model


def test_the_python_check_follows_imports_and_keywords():
    source = "from dinokit.eval.knn import knn_classify as k\nimport dinokit as dk\nk(x, kk=1)\ndk.pretrain(lrr=2)"
    tree = ast.parse(source)
    calls = dinokit_calls(tree, {"dinokit": "dinokit", **python_aliases(tree)})
    assert sorted(calls) == [("dinokit.eval.knn.knn_classify", ["kk"]), ("dinokit.pretrain", ["lrr"])]
    with pytest.raises(AssertionError, match="no keyword"):
        test_every_documented_python_call_exists_with_its_keywords("x", "dinokit.pretrain", ["lrr"])
    test_every_documented_python_call_exists_with_its_keywords("x", "dinokit.pretrain", ["lr", "data"])


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_docs_leads_somewhere():
    """The README's table of contents links to its headings: a renamed heading must not leave a dead link;
    links to files (docs/python.md, examples/...) name files that exist."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: link to {target}: no such file"
            if anchor and linked.suffix == ".md":
                prose = FENCE.sub("", linked.read_text(encoding="utf-8"))
                anchors = {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
                assert anchor in anchors, f"{path.name}: link to {target}: no such heading"


def defaults(command: str) -> dict:
    """The default of every key of `dinokit <command>`'s function."""
    module, func = COMMANDS[command].split(":")
    params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
    return {name: p.default for name, p in params.items()}


def test_the_defaults_the_readme_states_are_the_code_s():
    """Each default the README states in words, beside the value it has in the code: a changed default
    fails here until the README says the new one."""
    from dinokit.eval.released_segmentation import DEFAULT_SCALES, SCORING_SCALES
    from dinokit.train.finetune_config import FinetuneConfig

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    knn, linear, ft = defaults("eval knn"), defaults("eval linear"), FinetuneConfig()
    pictures = [defaults(c) for c in COMMANDS if c.startswith("visualize ")]
    stated = {
        "k = 10, 20, 100, 200, T = 0.07": knn["ks"] == [10, 20, 100, 200] and knn["temperature"] == 0.07,
        "`image_size` is 224 by default (`eval video`: 480)": (
            {knn["image_size"], linear["image_size"], defaults("eval depth")["image_size"]} == {224}
            and defaults("eval video")["image_size"] == 480
        ),
        "x 13 learning rates = 52 heads": len(linear["learning_rates"]) * 4 == 52,
        "(10% per class;": linear["selection_fraction"] == 0.1,
        "`max_pixels=1000000`": defaults("predict depth")["max_pixels"] == 1000000,
        "`scales=[1.0,1.32,1.73]`": DEFAULT_SCALES["ms"] == (1.0, 1.32, 1.73),
        "`[1.0,1.32,1.73,2.28,3.0]`": SCORING_SCALES["ms"] == (1.0, 1.32, 1.73, 2.28, 3.0),
        "`center_crop` (default for `embed`": defaults("embed")["resize_policy"] == "center_crop",
        "`aspect` (default for the pictures": {p["resize_policy"] for p in pictures} == {"aspect"},
        "`eval video` defaults to fp32": defaults("eval video")["precision"] == "fp32",
        "init trunc-normal std 2e-5": ft.head_init_std == 2e-5,
        "lr 5e-4 per 256 images of global batch, warm-up (`warmup_epochs=1`)": (ft.lr, ft.warmup_epochs) == (5e-4, 1),
        "layer-wise lr decay 0.75": ft.layer_decay == 0.75,
        "weight decay 0.05": ft.weight_decay == 0.05,
        "stochastic depth 0.1, label smoothing 0.1": (ft.drop_path_rate, ft.label_smoothing) == (0.1, 0.1),
    }
    for words, holds in stated.items():
        assert words in readme, f"the README no longer says {words!r}: update this test"
        assert holds, f"the README says {words!r}, the code has another default"


def test_the_developers_layout_names_every_module():
    """DEVELOPERS.md's layout lacked train/run_settings.py after pretrain / finetune were split: every
    module under src/dinokit (its file name) and every bench/ script must appear there."""
    layout = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    package = ROOT / "src" / "dinokit"
    modules = [p for p in package.rglob("*.py") if p.name != "__init__.py"] + sorted((ROOT / "bench").glob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in modules if p.stem not in layout]
    assert not missing, f"DEVELOPERS.md's layout does not name {missing}"
