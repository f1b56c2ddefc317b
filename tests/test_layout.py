"""docs/DESIGN.md's layout, checked on the package's files and imports: the top level holds only
commands, each area imports only the areas below it, and nothing imports a command."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kosmos2_jax"

# area -> the areas it may import (docs/DESIGN.md, "Layout"): a layered graph, no cycles
ALLOWED = {
    "utils": set(),
    "models": {"utils"},  # utils/errors.py: a bad model config is a UsageError
    "format": {"utils"},
    "weights": {"models", "utils"},
    "inference": {"models", "format", "utils"},
    "data": {"format", "utils"},
    "grit": {"format", "models", "weights", "utils"},
    "evaluation": {"data", "format", "inference", "models", "weights", "utils"},  # data: the refexp JSONL reader
    "serving": {"format", "inference", "models", "weights", "utils"},
    "train": {"data", "evaluation", "format", "inference", "models", "weights", "utils"},
}
TOP_LEVEL_COMMANDS = {"ablate", "convert", "evaluate", "export", "predict", "serve", "tokenizer"}
# `python -m kosmos2_jax.X` inside an area
AREA_COMMANDS = {"train.__main__", "data.build", "data.synthetic", "grit.build", "evaluation.language_data"}
COMMANDS = {f"kosmos2_jax.{c}" for c in TOP_LEVEL_COMMANDS | AREA_COMMANDS}


def _imports(path: pathlib.Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("kosmos2_jax.")}


def _library_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        module = "kosmos2_jax." + ".".join(rel.with_suffix("").parts)
        if len(rel.parts) > 1 and module not in COMMANDS:
            yield rel.parts[0], module, path


def test_the_top_level_holds_only_commands_and_the_areas():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL_COMMANDS
    assert packages == set(ALLOWED)
    for name in TOP_LEVEL_COMMANDS:  # each one runs as `python -m kosmos2_jax.NAME`
        assert 'if __name__ == "__main__":' in (PACKAGE / f"{name}.py").read_text(), name


def test_each_area_imports_only_the_areas_below_it():
    bad = []
    for area, module, path in _library_files():
        for name in sorted(_imports(path)):
            target = name.split(".")[1]
            if target != area and target in ALLOWED and target not in ALLOWED[area]:
                bad.append(f"{module} imports {name}")
    assert bad == []


def test_the_allowed_imports_have_no_cycle():
    done, stack = set(), []

    def visit(area):
        assert area not in stack, f"cycle: {stack + [area]}"
        stack.append(area)
        for below in ALLOWED[area]:
            if below not in done:
                visit(below)
        stack.pop()
        done.add(area)

    for area in ALLOWED:
        visit(area)


def test_no_library_module_imports_a_command():
    bad = [f"{module} imports {name}" for _, module, path in _library_files() for name in sorted(_imports(path))
           if name in COMMANDS or any(name.startswith(c + ".") for c in COMMANDS)]
    assert bad == []


def test_one_module_per_concept():
    """One box rule, one image opener, one CLIP normalization, one file name per concept (a command
    may share its library module's name: `tokenizer.py` runs `format/tokenizer.py`)."""
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__", "build")
             and p.parent != PACKAGE]
    assert sorted({s for s in stems if stems.count(s) > 1}) == []
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    for definition in ("def check_box(", "def open_image(", "CLIP_MEAN = ", "def normalize_pixels("):
        assert sum(s.count(definition) for s in sources.values()) == 1, definition


def test_only_the_web_page_imports_gradio():
    # serving (requests, batching) works without the `serve` extra; only the page needs Gradio
    users = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "gradio" or n.startswith("gradio.") for n in names):
                users.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(set(users)) == ["serve.py", "serving/webapp.py"]
