"""The layer rules of docs/architecture.md, enforced on the import graph: lower layers know nothing of higher ones.

Every module of refimpl/ is parsed (ast, nothing is imported) and each of its imports of a refimpl module or a
backend plugin is an edge. The rules:
- refimpl/ never imports a backend plugin (refimpl_numba, refimpl_cupy): backends are found through the
  `refimpl.backends` entry points and used through the kernel table only;
- the NumPy kernels import nothing of refimpl but themselves;
- the model core (autodiff, functional, nn, attention, model, tiling, activation checkpointing, deferred init, the
  backend table) knows nothing of ZeRO, the memory tiers, communication, the engine or the command line;
- communicators know nothing of ZeRO, the tiers or the engine; the tiers nothing of ZeRO or the engine; ZeRO
  nothing of the engine, the training loop or the command line;
- inside the tiers, the stores (store, mmap_store, aio_store, swap_files, crc32) know nothing of the swappers,
  the copy stream or the ledger that use them;
- the ZeRO stages are siblings: no stage imports another (they share zero/base.py, buckets.py, grad_offload.py).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "refimpl"

MODEL_CORE = ("refimpl.autodiff", "refimpl.functional", "refimpl.nn", "refimpl.attention", "refimpl.model",
              "refimpl.tiling", "refimpl.activation_checkpointing", "refimpl.deferred_init", "refimpl.backend")
ABOVE_THE_CORE = ("refimpl.zero", "refimpl.memory", "refimpl.comm", "refimpl.engine", "refimpl.train",
                  "refimpl.cli", "refimpl.config", "refimpl.crosscheck", "refimpl.checkpoint")
STORES = ("refimpl.memory.store", "refimpl.memory.mmap_store", "refimpl.memory.aio_store",
          "refimpl.memory.swap_files", "refimpl.memory.crc32")
STAGES = tuple(f"refimpl.zero.stage{k}" for k in range(4))
RULES = [
    # (modules the rule is about, what they must not import, exceptions, why)
    (("refimpl",), ("refimpl_numba", "refimpl_cupy"), (), "core never imports a backend plugin"),
    (("refimpl.kernels",), ("refimpl",), ("refimpl.kernels",), "the reference kernels import only themselves"),
    (MODEL_CORE, ABOVE_THE_CORE, (), "the model core knows nothing of ZeRO, tiers, comm, engine or CLI"),
    (("refimpl.comm",), ("refimpl.zero", "refimpl.memory", "refimpl.engine", "refimpl.train"), (),
     "communicators sit below ZeRO and the tiers"),
    (("refimpl.memory",), ("refimpl.zero", "refimpl.engine", "refimpl.train", "refimpl.cli"), (),
     "the tiers sit below ZeRO and the engine"),
    (("refimpl.zero",), ("refimpl.engine", "refimpl.train", "refimpl.cli", "refimpl.crosscheck"), (),
     "ZeRO sits below the engine"),
    (STORES, ("refimpl.memory.param_offload", "refimpl.memory.optimizer_offload", "refimpl.memory.transfer",
              "refimpl.memory.ledger", "refimpl.memory.budget"), (), "the stores sit below the swappers"),
] + [((stage,), STAGES, (stage,), f"{stage} is a sibling of the other stages") for stage in STAGES]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """module -> the refimpl modules and plugins it imports (relative imports resolved)."""
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    if node.module:
                        deps.add(".".join(base + [node.module]))
                    else:               # `from . import x`: the submodule x
                        deps.update(".".join(base + [alias.name]) for alias in node.names)
                else:
                    deps.add(node.module or "")
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d.startswith(("refimpl", "refimpl_"))}
    return graph


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph, rule) -> list:
    who, forbidden, allowed, _ = rule
    return sorted(f"{m} imports {d}" for m, deps in graph.items() if _within(m, who)
                  for d in deps if _within(d, forbidden) and not _within(d, allowed))


@pytest.mark.parametrize("rule", RULES, ids=[r[3] for r in RULES])
def test_layer_rule(rule):
    graph = import_graph()
    assert len(graph) > 40            # the walk found the package
    assert not violations(graph, rule), f"{rule[3]}: {violations(graph, rule)}"


def test_the_rules_can_fail():
    """The checker reports a forbidden edge when there is one: model.py importing zero/ (as it once did), a
    kernel importing the backend table, comm importing a plugin."""
    graph = import_graph()
    graph["refimpl.model"] = graph["refimpl.model"] | {"refimpl.zero.init"}
    graph["refimpl.kernels.dense"] = graph["refimpl.kernels.dense"] | {"refimpl.backend"}
    graph["refimpl.comm.nccl"] = graph["refimpl.comm.nccl"] | {"refimpl_cupy._runtime"}
    graph["refimpl.zero.stage3"] = graph["refimpl.zero.stage3"] | {"refimpl.zero.stage2"}   # the old tower
    assert violations(graph, RULES[2]) == ["refimpl.model imports refimpl.zero.init"]
    assert violations(graph, RULES[-1]) == ["refimpl.zero.stage3 imports refimpl.zero.stage2"]
    assert violations(graph, RULES[1]) == ["refimpl.kernels.dense imports refimpl.backend"]
    assert violations(graph, RULES[0]) == ["refimpl.comm.nccl imports refimpl_cupy._runtime"]


def floors(graph) -> dict:
    """module -> its floor: 0 for a module importing no other refimpl module, else one above its highest import."""
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    memo = {}

    def floor(m, seen=()):
        if m not in memo:
            memo[m] = 1 + max((floor(d, seen + (m,)) for d in graph[m] if d not in seen), default=-1)
        return memo[m]
    return {m: floor(m) for m in graph}


def not_down(graph) -> list:
    """Imports that do not go to a lower floor (a cycle has one)."""
    level = floors(graph)
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if d in level and d != m and level[d] >= level[m])


def test_every_import_points_down():
    """The graph has floors: every import goes to a lower floor (no cycle, no import sideways or up)."""
    assert not_down(import_graph()) == []


def test_a_cycle_is_caught():
    graph = import_graph()     # store.py building the stores it is the interface of, as it once did
    graph["refimpl.memory.store"] = graph["refimpl.memory.store"] | {"refimpl.memory.aio_store"}
    assert not_down(graph)


if __name__ == "__main__":     # python tests/test_layers.py: the floors, top down
    by_floor = {}
    for module, f in floors(import_graph()).items():
        by_floor.setdefault(f, []).append(module.removeprefix("refimpl."))
    for f in sorted(by_floor, reverse=True):
        print(f"floor {f:2d}: {', '.join(sorted(by_floor[f]))}")
