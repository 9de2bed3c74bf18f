"""``dvc.yaml`` lists, in each stage's ``deps``, every project module its stage script runs.

The closure of ``python -m pipelines.<stage>`` is computed with ``ast`` over every import statement
of every file it reaches (module level and inside functions). ``from a import b`` where ``a.b`` is a
module imports ``a.b``; importing ``a.b`` also runs ``a/__init__.py``; a package ``__init__`` with a
``_EXPORTS`` table (PEP 562 lazy names, as in ``omniquant/__init__.py``) makes ``from a import NAME``
import the module that defines ``NAME``. A dep covers a file if it is that file or a directory above it.
"""
from __future__ import annotations

import ast
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("omniquant", "pipelines")  # what counts as project code
SCRIPT = re.compile(r"python -m (pipelines\.\w+)")


def module_file(name: str) -> Path | None:
    """The file of project module ``name`` (a package: its ``__init__.py``), or None if it is not one."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    """A package's ``_EXPORTS = {name: module}`` table, if it has one."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _parsed(name: str) -> ast.Module:
    return ast.parse(module_file(name).read_text(), filename=str(module_file(name)))


def imported_by(name: str) -> set[str]:
    """Project modules that the file of module ``name`` imports (their parent packages included)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_parsed(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            exports = _lazy_exports(_parsed(base)) if module_file(base) and module_file(base).name == "__init__.py" else {}
            for alias in node.names:
                if module_file(f"{base}.{alias.name}"):
                    found.add(f"{base}.{alias.name}")
                elif alias.name in exports:
                    found.add(exports[alias.name])
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return {m for m in with_parents if module_file(m)}


def closure(script: str) -> set[str]:
    """Every project module that running ``python -m <script>`` imports, the script included."""
    todo = {".".join(script.split(".")[:i]) for i in range(1, script.count(".") + 2)}
    done: set[str] = set()
    while todo:
        name = todo.pop()
        done.add(name)
        todo |= imported_by(name) - done
    return done


def stages(dvc: dict) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the script its ``cmd`` runs, its ``deps``); ``foreach`` stages are read from ``do``."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        match = SCRIPT.search(body["cmd"])
        assert match, f"stage {name}: cmd does not run `python -m pipelines.<stage>`: {body['cmd']}"
        out[name] = (match[1], [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])])
    return out


def covers(dep: str, path: Path) -> bool:
    target = REPO / dep
    return path == target or target in path.parents


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def missing_deps(dvc: dict) -> dict[str, list[str]]:
    """Stage -> the modules of its import closure that none of its deps covers (``module (file)``)."""
    missing = {}
    for name, (script, deps) in stages(dvc).items():
        files = {m: module_file(m) for m in closure(script)}
        uncovered = sorted(f"{m} ({rel(f)})" for m, f in files.items() if not any(covers(d, f) for d in deps))
        if uncovered:
            missing[name] = uncovered
    return missing


def stale_code_deps(dvc: dict) -> dict[str, list[str]]:
    """Stage -> its project-code deps that cover no module of its import closure."""
    stale = {}
    for name, (script, deps) in stages(dvc).items():
        files = [module_file(m) for m in closure(script)]
        unused = [d for d in deps if d.split("/")[0] in PACKAGES and not any(covers(d, f) for f in files)]
        if unused:
            stale[name] = unused
    return stale


def report(missing: dict[str, list[str]]) -> str:
    return "\n".join(f"dvc.yaml stage {stage!r} does not list {m}" for stage, mods in missing.items() for m in mods)


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_lists_its_import_closure(dvc):
    missing = missing_deps(dvc)
    assert not missing, "\n" + report(missing)


def test_no_code_dep_is_outside_the_closure(dvc):
    stale = stale_code_deps(dvc)
    assert not stale, f"code deps no module of the stage imports: {stale}"


def test_code_deps_are_not_templated(dvc):
    """``${item.method}`` in a code dep would hide modules from this check; template artifacts and params only."""
    templated = [(name, d) for name, (_, deps) in stages(dvc).items() for d in deps
                 if d.split("/")[0] in PACKAGES and "${" in d]
    assert not templated


def test_the_check_reports_a_dropped_dep(dvc):
    broken = copy.deepcopy(dvc)
    deps = broken["stages"]["eval_ppl"]["do"]["deps"]
    deps.remove("omniquant/perplexity.py")
    assert missing_deps(broken) == {"eval_ppl": ["omniquant.perplexity (omniquant/perplexity.py)"]}
    assert "'eval_ppl' does not list omniquant.perplexity" in report(missing_deps(broken))


def test_closure_follows_submodules_packages_and_lazy_names():
    found = closure("pipelines.eval_ppl")
    assert {"pipelines", "pipelines._app", "omniquant", "omniquant.stages", "omniquant.stages.eval_ppl",
            "omniquant.stages.common", "omniquant.perplexity", "omniquant.layout"} <= found
    assert "omniquant.zeroshot" not in found and "omniquant.packing" not in found
    assert "omniquant.stages.quantize" not in found
    assert "omniquant.setting" in imported_by("omniquant.layout")  # an import under `if TYPE_CHECKING` counts
    assert imported_by("omniquant.stages.tables") >= {"omniquant", "omniquant.tables", "omniquant.zeroshot"}


@pytest.mark.parametrize("script", ["pipelines.eval_ppl", "pipelines.tables"])
def test_closure_holds_every_project_module_python_loads(script):
    """The static closure is a superset of what importing the script really loads."""
    code = (f"import sys, importlib; importlib.import_module({script!r}); "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('omniquant', 'pipelines')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    assert loaded and loaded <= closure(script)


def test_lazy_package_names_keep_their_meaning():
    code = ("import sys, omniquant.perplexity, omniquant.layout; "
            "assert 'omniquant.methods' not in sys.modules, 'importing a submodule ran the method modules'; "
            "from omniquant import QuantSetting, perplexity, quantize; "
            "import omniquant; assert callable(perplexity) and omniquant.perplexity is perplexity; "
            "assert quantize.__module__ == 'omniquant.methods' and QuantSetting.__module__ == 'omniquant.setting'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
