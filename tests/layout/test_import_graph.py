"""The dmdr package imports without circles, and its building blocks never import what assembles them.

Every module's imports (module level or in a function) form a DAG. The top-level packages fall in two groups: the
building blocks (math, models, data, rewards, logging, the distributed runtime) and the packages that assemble them
into a run or a tool (engine, trainer, build, planner, export, worlds, recipes, CLIs). An import from a block into an
assembling package is an upward arrow (issue 25 removed the last two: observability -> planning for the GPU table, now
``dmdr.gpus``; rewards -> worlds for the shapes reward, now registered by the world).
"""

from tests.layout.import_graph import cycles, edges, modules

BUILDING_BLOCKS = {
    "algorithm", "config", "data", "devices", "distributed", "errors", "generate", "gpus", "guidance", "kernels",
    "logs", "losses", "micro_batches", "models", "observability", "parameterization", "permissions", "profiling",
    "provenance", "rewards", "run_folder", "sampling", "schedules", "snapshots",
}
"""``dmdr.<name>`` packages and modules below the run: they import each other only."""
ASSEMBLY = {
    "build", "checkpoint_sampling", "cli", "engine", "evaluation", "export", "guard", "launch", "launcher",
    "planning", "preflight", "recipes", "returbo", "trainer", "worlds",
}
"""``dmdr.<name>`` packages and modules that assemble the building blocks (and may import each other)."""


def _top(module: str) -> str:
    """``dmdr.rewards.models`` -> ``rewards``; the ``dmdr`` package itself -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a building block into an assembling package, as ``a -> b``."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if _top(a) in BUILDING_BLOCKS and _top(b) in ASSEMBLY)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"dmdr.a": {"dmdr.b"}, "dmdr.b": {"dmdr.c"}, "dmdr.c": {"dmdr.a"}, "dmdr.d": {"dmdr.a"}}
    assert cycles(graph) == [["dmdr.a", "dmdr.b", "dmdr.c"]]
    assert cycles({"dmdr.a": {"dmdr.b"}, "dmdr.b": set()}) == []


def test_the_graph_reads_relative_and_submodule_imports():
    graph = edges(modules())
    assert "dmdr.kernels.reference" in graph["dmdr.kernels.dispatch"]  # `from .reference import ...`
    assert "dmdr.models.sd3" in graph["dmdr.models.families"]  # `from dmdr.models import sd3, ...`
    assert "dmdr.models.base" not in graph["dmdr.models.family"]  # under `if TYPE_CHECKING:` only


def package_graph(graph: dict[str, set[str]], tops: set[str]) -> dict[str, set[str]]:
    """The module graph folded onto the top-level packages ``tops`` (``dmdr.losses.dmd`` -> ``losses``)."""
    folded: dict[str, set[str]] = {t: set() for t in tops}
    for a, targets in graph.items():
        folded_targets = {_top(b) for b in targets} & tops
        if _top(a) in tops:
            folded[_top(a)] |= folded_targets - {_top(a)}
    return folded


def test_the_package_fold_finds_a_planted_package_circle():
    graph = {"dmdr.losses.dmd": {"dmdr.kernels"}, "dmdr.kernels": set(),
             "dmdr.kernels.reference": {"dmdr.losses.dmd_math"}, "dmdr.losses.dmd_math": set()}
    assert cycles(graph) == []  # no module circle ...
    assert cycles(package_graph(graph, {"losses", "kernels"})) == [["kernels", "losses"]]  # ... a package one


def test_no_import_circles_among_building_block_packages():
    """Blocks stack: one package uses another, never both ways (losses -> kernels; the kernels' references
    define the DMD math the losses use, so the kernels never read the losses)."""
    found = cycles(package_graph(edges(modules()), BUILDING_BLOCKS))
    assert not found, "package circles among building blocks: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_upward_check_finds_a_planted_upward_import():
    graph = {"dmdr.rewards.x": {"dmdr.worlds.shapes.reward", "dmdr.errors"}, "dmdr.worlds.y": {"dmdr.rewards.x"}}
    assert upward_imports(graph) == ["dmdr.rewards.x -> dmdr.worlds.shapes.reward"]


def test_every_top_level_package_is_placed_in_a_layer():
    tops = {_top(m) for m in modules()} - {""}
    assert not BUILDING_BLOCKS & ASSEMBLY
    unplaced = sorted(tops - BUILDING_BLOCKS - ASSEMBLY)
    assert not unplaced, f"place dmdr.{unplaced[0]} in BUILDING_BLOCKS or ASSEMBLY of this file: {unplaced}"


def test_building_blocks_never_import_the_packages_that_assemble_them():
    found = upward_imports(edges(modules()))
    assert not found, "upward imports: " + "; ".join(found)


def test_no_import_cycles_among_dmdr_modules():
    found = cycles(edges(modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
