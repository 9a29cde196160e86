"""The structure of ``clipo_jax.rubrics``: every module imports alone in a fresh interpreter, the
package's internal import graph (every import statement, function-level ones included) has no
cycle, the shared types live in one module, and the names other code imports from the package,
from ``backends`` and from ``refine`` are still there."""

import ast
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PKG = REPO / "clipo_jax" / "rubrics"
PREFIX = "clipo_jax.rubrics"


def module_names() -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join([PREFIX, *parts]))
    return out


def module_path(name: str) -> pathlib.Path:
    rel = name[len(PREFIX) :].lstrip(".").replace(".", "/")
    base = PKG / rel if rel else PKG
    return base / "__init__.py" if (base / "__init__.py").exists() else base.with_suffix(".py")


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def internal_imports(name: str, modules: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source (module level or in a
    function), except under ``if TYPE_CHECKING:``.  ``from clipo_jax.rubrics import x`` counts as
    an import of the submodule x when x is one, else of the package itself."""
    path = module_path(name)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in modules else base)
        for t in targets:
            # the longest package module that t names (t may be a module or a package)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith(PREFIX) and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


MODULES = module_names()


def test_the_package_has_the_modules_the_structure_names():
    for required in ("types", "backends", "local_backends", "registry", "judge", "logit_judge", "replay"):
        assert f"{PREFIX}.{required}" in MODULES
    for part in ("refine", "refine.mutations", "refine.evolution", "refine.review", "refine.fitness"):
        assert f"{PREFIX}.{part}" in MODULES


def test_internal_import_graph_is_acyclic():
    modules = set(MODULES)
    graph = {m: internal_imports(m, modules) for m in MODULES}
    # The parser sees real edges (a sanity check that it does not silently find nothing).
    assert f"{PREFIX}.types" in graph[f"{PREFIX}.judge"]
    assert f"{PREFIX}.local_backends" in graph[f"{PREFIX}.registry"]  # the function-level import counts
    assert f"{PREFIX}.refine.mutations" in graph[f"{PREFIX}.refine.evolution"]
    # The package's __init__ loads its exports lazily: it imports no submodule and none imports it.
    assert graph[PREFIX] == set()
    assert not [m for m, deps in graph.items() if PREFIX in deps]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_shared_types_have_one_home():
    """The types are defined in types.py only; the other modules import them from there."""
    for name in ("BackendError", "CompletionRequest", "CompletionResponse", "PairInput", "PairResult"):
        defined = [m for m in MODULES if f"class {name}" in module_path(m).read_text(encoding="utf-8")]
        assert defined == [f"{PREFIX}.types"], (name, defined)
    graph_types = internal_imports(f"{PREFIX}.types", set(MODULES))
    assert graph_types == set()  # types.py depends on nothing in the package at run time


def _import_alone(name: str) -> tuple[str, int, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = (
        "import importlib, sys\n"
        f"m = importlib.import_module({name!r})\n"
        "heavy = sorted(k for k in ('jax', 'clipo_jax.models', 'clipo_jax.rubrics.local_backends') if k in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return name, r.returncode, (r.stdout + r.stderr).strip()


def test_every_module_imports_alone_in_a_fresh_process():
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_alone, MODULES))
    failed = [(n, out[-600:]) for n, rc, out in results if rc != 0]
    assert not failed, failed
    loaded = {n: out.splitlines()[-1] if out else "" for n, _, out in results}
    # Light modules stay light: the shared types, the HTTP backend and the registry load neither
    # JAX nor the model code.
    for light in ("types", "backends", "registry", "cache", "replay", "pairs", "protocol", "meta_rubric"):
        assert loaded[f"{PREFIX}.{light}"] == "", (light, loaded[f"{PREFIX}.{light}"])


PUBLIC = {
    PREFIX: (
        "BACKENDS Backend BackendError CompletionRequest CompletionResponse InProcessBackend JudgeConfig "
        "JudgeParseError LogitBackend LogitJudge LogitVerdictBackend MetaRubric MetaRubricError "
        "OpenAIHTTPBackend PairInput PairResult PairwiseJudge aggregate_scores available_domains "
        "batch_verdicts builtin_meta_rubric domain_for_query_type load_meta_rubric make_backend "
        "pad_criteria parse_judgment score_comparison summarise verdict pvr sandbox"
    ),
    f"{PREFIX}.backends": "Backend BackendError CompletionRequest CompletionResponse LogitBackend OpenAIHTTPBackend",
    f"{PREFIX}.judge": "DirectionResult JudgeConfig JudgeCounters PairInput PairResult PairwiseJudge summarise",
    f"{PREFIX}.local_backends": "InProcessBackend LogitVerdictBackend LogitJudge MicroBatcher LABELS",
    f"{PREFIX}.registry": "BACKENDS make_backend build_judge",
    f"{PREFIX}.refine": (
        "MUTATIONS MutationPool RefineConfig RefineError Refiner apply_edit compute_fitness "
        "load_preference_pairs programmatic_mutation refine review_edit write_meta_rubric build_judge "
        "write_review_record Fitness Flip ReviewReport EDIT_SCHEMA LLM_OPS"
    ),
    f"{PREFIX}.replay": "ReplayBackend RecordingBackend request_key load_transcript",
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_importable_where_they_were(module):
    import importlib

    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module].split() if not hasattr(mod, n)]
    assert not missing, missing


def test_one_class_behind_the_reexports():
    import clipo_jax.rubrics as R
    from clipo_jax.rubrics import backends, judge, local_backends, logit_judge, refine, registry, types

    assert R.PairInput is judge.PairInput is types.PairInput
    assert R.BackendError is backends.BackendError is types.BackendError
    assert R.LogitJudge is local_backends.LogitJudge is logit_judge.LogitJudge
    assert R.make_backend is registry.make_backend and refine.build_judge is registry.build_judge
    assert "in-process" in R.BACKENDS and "logit" in R.BACKENDS and "openai" in R.BACKENDS
    with pytest.raises(AttributeError):
        R.no_such_name
