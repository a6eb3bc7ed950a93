"""The module graph: no import cycle anywhere in cpjax or pallas_kernels.

The layer contracts between packages are import-linter's (``make lint``, ``[tool.importlinter]``
in pyproject.toml); this test also covers cycles inside a package (e.g. engine <-> session),
counting imports inside functions too.
"""

import grimp


def _cycles(graph) -> list[tuple[str, ...]]:
    found = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                found.append((module, *back))
    return found


def test_no_module_imports_itself_through_others():
    assert _cycles(grimp.build_graph("cpjax", "pallas_kernels")) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    assert _cycles(graph)
