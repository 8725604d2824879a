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
            allowed = {"torch", "transformers", "<relative>", "math", "collections", "dataclasses", "typing", "textwrap"}
            assert inside_try or roots <= allowed, f"{name} imports {roots - allowed}"
