"""The harness's table preparation and result conversion, without an agent (the socket path is
tested end to end by `cargo test -p quiver-preload`)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI") in ("true", "1"):
        raise
    pytest.skip("pyarrow is not installed (run scripts/setup)", allow_module_level=True)

from quiver import _harness  # noqa: E402


def table():
    return pa.table({
        "id": pa.array(range(10), pa.int64()),
        "x": pa.array([i * 1.5 for i in range(10)], pa.float64()),
        "country": pa.array(["IT", "FR", "DE", None, "IT", "ES", "FR", "IT", "DE", "FR"]),
    })


def test_columns_are_selected_without_a_copy():
    t = table()
    out = _harness._prepare(t, {"arg": "d", "parent": "p", "columns": ["x", "id"], "filter": None})
    assert out.column_names == ["x", "id"]
    assert out.column("x").chunk(0).buffers()[1].address == t.column("x").chunk(0).buffers()[1].address


def test_filter_keeps_matching_rows_and_drops_nulls():
    p = {"arg": "d", "parent": "p", "columns": ["id"], "filter": [
        {"Cmp": {"column": "x", "op": "Ge", "value": {"Int": 3}}},
        {"In": {"column": "country", "values": [{"Str": "IT"}, {"Str": "FR"}]}},
    ]}
    out = _harness._prepare(table(), p)
    assert out.column_names == ["id"]
    assert out.column("id").to_pylist() == [4, 6, 7, 9]


@pytest.mark.parametrize("op,value,want", [
    ("Eq", {"Int": 2}, [2]), ("Ne", {"Int": 2}, [0, 1, 3, 4, 5, 6, 7, 8, 9]), ("Lt", {"Int": 2}, [0, 1]),
    ("Le", {"Int": 2}, [0, 1, 2]), ("Gt", {"Int": 7}, [8, 9]), ("Ge", {"Float": 7.5}, [8, 9]),
])
def test_each_comparison(op, value, want):
    p = {"arg": "d", "parent": "p", "columns": None, "filter": [{"Cmp": {"column": "id", "op": op, "value": value}}]}
    assert _harness._prepare(table(), p).column("id").to_pylist() == want


def test_unknown_columns_and_bad_literals_are_user_errors():
    with pytest.raises(_harness.UserError, match="no column 'nope'"):
        _harness._prepare(table(), {"arg": "d", "parent": "p", "columns": ["nope"], "filter": None})
    with pytest.raises(_harness.UserError, match="filter on country"):
        _harness._prepare(table(), {"arg": "d", "parent": "p", "columns": None,
                                    "filter": [{"Cmp": {"column": "country", "op": "Gt", "value": {"Bool": True}}}]})


def test_results_convert_to_tables():
    t = table()
    assert _harness._to_arrow(t, "n") is t
    assert _harness._to_arrow(t.to_batches()[0], "n").num_rows == 10
    # scripts/setup installs pandas; its absence is a broken setup, not a reason to skip.
    import pandas as pd
    df = pd.DataFrame({"a": [1, 2]}, index=[5, 6])
    out = _harness._to_arrow(df, "n")
    assert out.column_names == ["a"]
    with pytest.raises(_harness.UserError, match="builtins.list"):
        _harness._to_arrow([1, 2], "n")


def test_expectation_results():
    assert _harness._expectation(True, "e") == "Passed"
    with pytest.raises(_harness.UserError, match="expectation e returned False"):
        _harness._expectation(False, "e")
    with pytest.raises(_harness.UserError, match="not a bool"):
        _harness._expectation(1, "e")


def test_read_only_errors_get_the_hint():
    arr = pa.array([1.0, 2.0]).to_numpy(zero_copy_only=True)
    try:
        arr[0] = 3.0
    except ValueError as e:
        msg = _harness._describe(e, "/nonexistent")
    assert "inputs are read-only" in msg and "copy" in msg


def test_only_the_calling_process_returns_from_a_call():
    # A function that forks: the child returning into the harness must end, not answer.
    def forks():
        return "child" if os.fork() == 0 else "parent"

    pid_before = os.getpid()
    result = _harness._call(forks, {}, "/nonexistent/m.py")
    assert os.getpid() == pid_before and result == "parent"
    _, status = os.wait()
    assert os.waitstatus_to_exitcode(status) == 0
