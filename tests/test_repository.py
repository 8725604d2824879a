"""Promises the repository keeps: the README's test command is what CI runs, and the files copied into every
checkpoint import only torch, transformers and each other."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands_and_ci_runs_the_test_command():
    setup_and_demo, setup_and_tests = _readme_commands()
    assert "modification demo" in setup_and_demo and "torch==2.13.0" in setup_and_demo
    assert "pytest" in setup_and_tests and "torch==2.13.0" in setup_and_tests
    assert setup_and_tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_modeling_files_import_only_torch_transformers_and_each_other():
    for name in ("configuration_mod.py", "modeling_mod.py"):
        tree = ast.parse((ROOT / "modeling" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"<relative>"} if node.level else {node.module.split(".")[0]}
            else:
                continue
            inside_try = False  # optional kernels (flash_attn) are imported inside try blocks, as transformers expects
            for parent in ast.walk(tree):
                if isinstance(parent, ast.Try) and any(child is node for child in ast.walk(parent)):
                    inside_try = True
            allowed = {"torch", "transformers", "<relative>", "math", "collections", "dataclasses", "typing",
                       "textwrap"}
            assert inside_try or roots <= allowed, f"{name} imports {roots - allowed}"


# The parts of the `modification` package: import name -> folder.
PARTS = {"modeling": "modeling", "conversion": "conversion", "evaluation": "evaluation", "cli": "cli",
         "push_scripts": "push_scripts", "model_cards": "model_cards"}
# Toolkit files allowed above ~400 lines, and why.
LONG_FILES = {
    "modeling/modeling_mod.py": "the model, one file as transformers' modeling files are (copied into checkpoints)",
    "modeling/configuration_mod.py": "the config, copied into every checkpoint beside the model (routing fields, plan)",
    "model_cards/card.py": "every section of the card (quality, look-up, passkey, efficiency, routing); to split next",
    "conversion/fit.py": "one measured procedure (costs, router regression, plans, checkpoint) read top to bottom",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for part, folder in PARTS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = f"modification.{part}" + ("" if path.stem == "__init__" else f".{path.stem}")
            modules[name] = path
    return modules


def _benchmarks() -> dict[str, Path]:
    """The benchmark scripts (outside the package), by the name an import of one would use."""
    return {f"benchmarks.{path.stem}": path for path in sorted((ROOT / "benchmarks").glob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (also inside functions: a circle through a lazy
    import is still a circle in the design)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate.count(".") >= 2:
                found.add(candidate)
    return found


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["modification.cli.demo"] and graph["modification.evaluation.quality"]  # the scan sees imports

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    circles = [cycle for cycle in map(cycle_from, graph) if cycle]
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_layers_depend_one_way():
    """The model knows nothing of the toolkit; conversion knows nothing of evaluation, the CLI or publishing; only
    the CLI's own modules import the CLI (the release runs steps from their settings, not through the CLI)."""
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(name, path, set(modules))
        part = name.split(".")[1]
        forbidden = {
            "modeling": {"conversion", "evaluation", "cli", "push_scripts", "model_cards"},
            "conversion": {"evaluation", "cli", "push_scripts", "model_cards"},
            "evaluation": {"cli", "push_scripts", "model_cards"},
            "model_cards": {"cli", "push_scripts", "evaluation"},
            "push_scripts": {"cli"},
        }.get(part, set())
        bad = sorted(m for m in imported if m.split(".")[1] in forbidden)
        assert not bad, f"{name} imports {bad}"


def _import_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "spec_from_file_location", "run_path"):
            roots |= {arg.value.split(".")[0].split("/")[0] for arg in node.args if isinstance(arg, ast.Constant)}
    return roots


def test_benchmarks_call_the_library_and_nothing_imports_them():
    """Benchmarks may use anything of the package, but its public names only, and never patch it (replace what a
    module holds); no module of the package or benchmark imports a benchmark."""
    benchmarks = _benchmarks()
    assert "benchmarks.quality_curve" in benchmarks
    for name, path in {**_modules(), **benchmarks}.items():
        assert "benchmarks" not in _import_roots(path), f"{name} imports a benchmark"
    for name, path in benchmarks.items():
        tree = ast.parse(path.read_text())
        modules = set()  # names bound to imported modules, e.g. `from modification.conversion import fit`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modification"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{name} imports private names {private} from {node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                patched = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                    target.value.id in modules
                assert not patched, f"{name}:{node.lineno} patches {target.value.id}.{target.attr}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
                first = node.args[0]
                assert not (isinstance(first, ast.Name) and first.id in modules), f"{name}:{node.lineno} patches"


def test_toolkit_files_stay_short_or_say_why():
    paths = [*_modules().values(), *_benchmarks().values()]
    assert any(path.parent.name == "benchmarks" for path in paths)
    for path in paths:
        relative = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        assert lines <= 420 or relative in LONG_FILES, f"{relative} has {lines} lines"
    for relative in LONG_FILES:
        assert (ROOT / relative).is_file()


def test_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    for part, folder in PARTS.items():
        assert f"`{folder}/`" in layout, folder
        for path in (ROOT / folder).glob("*.py"):
            if path.stem not in ("__init__", "__main__"):
                assert f"`{path.stem}`" in layout or f"`{path.name}`" in layout, f"{folder}/{path.name}"
