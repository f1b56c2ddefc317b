"""docs/DESIGN.md's dependency rules, checked on the imports of the library's modules."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kosmos2_jax"


def _imports(folder: str) -> dict:
    out = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[path.relative_to(PACKAGE).as_posix()] = names
    return out


def _offending(folder: str, forbidden: tuple) -> list:
    return [(f, m) for f, names in _imports(folder).items() for m in sorted(names)
            if any(m == p or m.startswith(p + ".") for p in forbidden)]


def test_grit_stands_alone():
    assert _offending("grit", ("kosmos2_jax.evaluation", "kosmos2_jax.train")) == []


def test_models_import_nothing_else_of_the_package():
    allowed = ("kosmos2_jax.models",)
    bad = [(f, m) for f, names in _imports("models").items() for m in sorted(names)
           if m.startswith("kosmos2_jax") and not m.startswith(allowed)]
    assert bad == []


def test_data_never_imports_models_or_train():
    assert _offending("data", ("kosmos2_jax.models", "kosmos2_jax.train")) == []


def test_no_library_module_imports_a_cli_module():
    clis = ("kosmos2_jax.train.__main__", "kosmos2_jax.predict", "kosmos2_jax.evaluate", "kosmos2_jax.export",
            "kosmos2_jax.grit.build", "kosmos2_jax.data.build", "kosmos2_jax.serve")
    bad = [(f, m) for folder in ("models", "data", "train", "evaluation", "grit")
           for f, names in _imports(folder).items() for m in sorted(names) if m in clis
           and f"kosmos2_jax/{f}" != m.replace(".", "/") + ".py"]
    assert bad == []


def test_only_the_web_page_imports_gradio():
    # serving (requests, batching) works without the `serve` extra; only the page needs Gradio
    users = sorted(f for f, names in _imports(".").items() if any(m == "gradio" or m.startswith("gradio.")
                                                                  for m in names))
    assert users == ["serve.py", "webapp.py"]
