"""Bytes each context-parallel strategy sends, by formula and as read from compiled HLO.

Per layer and per rank, for local query rows ``Tq``, local K/V rows ``Tk`` (both padded),
``Hq``/``Hkv`` local heads of width ``Dh`` and ``e`` bytes per element (paper §3-4, Table 3;
positions and segment ids travel with their rows as two int32 each):

* pass-KV: ``(N-1) * Tk * (2 * Hkv * Dh * e + 8)`` — N-1 ring steps of K, V, pos, seg;
* pass-Q:  ``(N-1) * Tq * (Hq * Dh * e + 8)`` for the ring, plus the all-to-all that returns
  N-1 partial outputs with their float32 LSE: ``(N-1) * Tq * Hq * (Dh * e + 4)``;
* all-gather: ``(N-1) * Tk * (2 * Hkv * Dh * e + 8)`` (each rank's block reaches N-1 others).
"""

from __future__ import annotations

import re

from cpjax.errors import CpjaxError

_DTYPE_BYTES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "f64": 8,
    "s64": 8,
}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(collective-permute|all-to-all|all-gather)(-start|-done)?\(")


def formula_bytes_per_layer(
    strategy: str, n: int, tq: int, tk: int, hq: int, hkv: int, dh: int, elem_bytes: int
) -> int:
    """Bytes one rank sends per layer under ``strategy`` (see the module docstring)."""
    if n == 1:
        return 0
    kv_rows = tk * (2 * hkv * dh * elem_bytes + 8)
    if strategy == "pass_kv" or strategy == "all_gather":
        return (n - 1) * kv_rows
    if strategy == "pass_q":
        return (n - 1) * tq * (hq * dh * elem_bytes + 8) + (n - 1) * tq * hq * (dh * elem_bytes + 4)
    raise CpjaxError(f"unknown strategy {strategy!r}")


def _shape_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES[dtype]
    return total


def _top_level(type_text: str) -> list[str]:
    """The top-level elements of an HLO tuple type ``(a, (b, c), d[1,2]{1,0})``."""
    inner = type_text.strip()[1:-1]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    return parts + [inner[start:]]


def _payload_type(type_text: str, suffix: str) -> str:
    """The result buffer of a collective: its whole type for a synchronous op, the second
    element of the tuple of an asynchronous ``-start`` (``(operands, results, contexts...)``:
    ``collective-permute-start`` ends with ``u32[]`` contexts, ``all-gather-start`` and
    ``all-to-all-start`` may wrap their operands in an inner tuple)."""
    return _top_level(type_text)[1] if suffix == "-start" else type_text


_CALLEE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The lines of each computation of ``hlo_text`` by name (a computation opens with an
    unindented line ending in ``{``, optionally ``ENTRY``, and closes with ``}``), and the
    entry's name (the last computation when none is marked ``ENTRY``)."""
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        if line.startswith("}"):
            name = None
        elif line[:1] not in (" ", "\t", "") and line.rstrip().endswith("{"):
            words = line.split()
            is_entry = words[0] == "ENTRY"
            name = words[1 if is_entry else 0].lstrip("%")
            bodies[name] = []
            entry = name if is_entry else entry
        elif name is not None:
            bodies[name].append(line)
    return bodies, entry if entry is not None else list(bodies)[-1]


def _runs_per_program(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs when the program runs once: a ``while`` body
    runs its known trip count times per run of its caller; every other callee (fusions,
    branches of a conditional, async wrappers) once per run of its caller (an upper bound
    for branches)."""
    callees: dict[str, list[tuple[str, int]]] = {name: [] for name in bodies}
    for name, lines in bodies.items():
        for line in lines:
            trips = _TRIP_COUNT.search(line)
            for role, callee in _CALLEE.findall(line):
                if callee in bodies:
                    runs = int(trips.group(1)) if role == "body" and trips else 1
                    callees[name].append((callee, runs))
            for group in _BRANCHES.findall(line):
                for callee in (c.strip().lstrip("%") for c in group.split(",")):
                    if callee in bodies:
                        callees[name].append((callee, 1))
    runs = {name: 0 for name in bodies}

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for callee, per_call in callees[name]:
            visit(callee, times * per_call)

    visit(entry, 1)
    return runs


def hlo_collective_bytes(hlo_text: str, n: int) -> dict[str, int]:
    """Bytes one rank sends per collective kind when the program of ``hlo_text`` runs once.

    An op inside a ``while`` loop counts as many times as the loop's known trip count (XLA's
    ``known_trip_count``; nested loops multiply): for a model forward, divide by the layers
    for bytes per layer. collective-permute sends its operand; all-to-all sends (n-1)/n of
    it; all-gather sends its operand to n-1 ranks (its result is n operands). An asynchronous
    pair (``-start`` / ``-done``, as XLA emits on GPU) is one transfer, counted at its
    ``-start`` from the result buffer inside the start's tuple; an op wrapped in
    ``async-start`` is counted once, in the computation it calls.
    """
    bodies, entry = _computations(hlo_text)
    runs = _runs_per_program(bodies, entry)
    sent = {"collective-permute": 0, "all-to-all": 0, "all-gather": 0}
    for name, lines in bodies.items():
        for line in lines:
            match = _OP.search(line)
            if not match or match.group(3) == "-done":
                continue
            type_text, kind, suffix = match.groups()
            result_bytes = _shape_bytes(_payload_type(type_text, suffix)) * runs[name]
            if kind == "collective-permute":
                sent[kind] += result_bytes
            else:
                sent[kind] += result_bytes * (n - 1) // n
    return sent
