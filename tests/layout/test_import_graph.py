"""The dmdr package imports without circles: every module's imports (module level or in a function) form a DAG."""

from import_graph import cycles, edges, modules


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"dmdr.a": {"dmdr.b"}, "dmdr.b": {"dmdr.c"}, "dmdr.c": {"dmdr.a"}, "dmdr.d": {"dmdr.a"}}
    assert cycles(graph) == [["dmdr.a", "dmdr.b", "dmdr.c"]]
    assert cycles({"dmdr.a": {"dmdr.b"}, "dmdr.b": set()}) == []


def test_the_graph_reads_relative_and_submodule_imports():
    graph = edges(modules())
    assert "dmdr.kernels.reference" in graph["dmdr.kernels.dispatch"]  # `from .reference import ...`
    assert "dmdr.models.sd3" in graph["dmdr.models.families"]  # `from dmdr.models import sd3, ...`
    assert "dmdr.models.base" not in graph["dmdr.models.family"]  # under `if TYPE_CHECKING:` only


def test_no_import_cycles_among_dmdr_modules():
    found = cycles(edges(modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
