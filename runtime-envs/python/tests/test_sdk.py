"""The SDK's decorators and `python -m quiver.discover`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
sys.path.insert(0, PKG_ROOT)

import quiver  # noqa: E402
from quiver import discover as disc  # noqa: E402


def test_decorators_attach_metadata_and_return_the_function():
    @quiver.model(materialize=True, name="totals", internet_access=True)
    @quiver.python("3.11", pip={"pandas": "2.2"})
    @quiver.resources(memory="2GB", cpus=1.5, timeout=30)
    def f(data=quiver.Model("trips", columns=["a"], filter="a > 1")):
        return data

    assert f("x") == "x"
    m = f.__quiver__
    assert m["kind"] == "model" and m["materialize"] and m["name"] == "totals" and m["internet_access"]
    assert m["env"] == {"python": "3.11", "pip": {"pandas": "2.2"}}
    assert m["resources"] == {"memory": 2_000_000_000, "cpus": 1.5, "timeout_s": 30.0}


def test_decorator_order_does_not_matter():
    @quiver.python("3.12")
    @quiver.model()
    def g():
        pass

    assert g.__quiver__["kind"] == "model" and g.__quiver__["env"]["python"] == "3.12"


@pytest.mark.parametrize(
    "text,bytes_",
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000), ("100", 100), (4096, 4096), ("3 gib", 3 * 2**30)],
)
def test_memory_sizes(text, bytes_):
    assert quiver.parse_memory(text) == bytes_


@pytest.mark.parametrize("bad", ["lots", "2XB", "-1GB", 0, -5, True, 1.5])
def test_bad_memory_sizes_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        quiver.parse_memory(bad)


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError):
        quiver.python("three")
    with pytest.raises(TypeError):
        quiver.python("3.11", pip={"pandas": 2})
    with pytest.raises(TypeError):
        quiver.Model("")
    with pytest.raises(TypeError):
        quiver.Model("t", columns="abc")
    with pytest.raises(ValueError):
        quiver.resources(cpus=0)
    with pytest.raises(ValueError):
        quiver.resources(timeout=-1)


def run_discover(folder):
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    return subprocess.run([sys.executable, "-m", "quiver.discover", str(folder)], capture_output=True, text=True, env=env)


def write(folder, name, src):
    (folder / name).write_text(textwrap.dedent(src))


def test_discover_lists_models_and_expectations(tmp_path):
    write(tmp_path, "models.py", """
        import quiver

        @quiver.model(materialize=True)
        @quiver.python("3.11", pip={"pandas": "2.2"})
        def usd_by_country(data=quiver.Model("euro_selection")):
            return data

        @quiver.model(name="euro_selection")
        @quiver.python("3.11", pip={"pyarrow": "26"})
        @quiver.resources(memory="1GiB", timeout=60)
        def select(data=quiver.Model("transactions", columns=["id", "usd", "country"],
                                     filter="country IN ('IT', 'FR')")):
            return data

        def helper():
            return 1
        """)
    write(tmp_path, "checks.py", """
        import quiver
        from models import usd_by_country  # imported models belong to their own file

        @quiver.expectation()
        def no_negative(data=quiver.Model("usd_by_country")):
            return True
        """)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "ignored.py", "raise SystemExit('not imported')\n")
    r = run_discover(tmp_path)
    assert r.returncode == 0, r.stderr
    got = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(got) == {"usd_by_country", "euro_selection", "no_negative"}
    u = got["usd_by_country"]
    assert u["module"] == str(tmp_path / "models.py") and u["function"] == "usd_by_country"
    assert u["materialize"] and not u["expectation"] and not u["internet_access"]
    assert u["env"] == {"python": "3.11", "pip": {"pandas": "2.2"}}
    assert u["params"] == [{"arg": "data", "parent": "euro_selection", "columns": None, "filter": None}]
    assert u["resources"] == {"memory": None, "cpus": None, "timeout_s": None}
    s = got["euro_selection"]
    assert s["function"] == "select"
    assert s["params"] == [{"arg": "data", "parent": "transactions", "columns": ["id", "usd", "country"],
                            "filter": "country IN ('IT', 'FR')"}]
    assert s["resources"] == {"memory": 2**30, "cpus": None, "timeout_s": 60.0}
    n = got["no_negative"]
    assert n["expectation"] and n["module"] == str(tmp_path / "checks.py")


def test_discover_without_env_uses_the_running_python(tmp_path):
    write(tmp_path, "m.py", """
        import quiver

        @quiver.model()
        def plain(t=quiver.Model("src")):
            return t
        """)
    r = run_discover(tmp_path)
    assert r.returncode == 0, r.stderr
    (m,) = json.loads(r.stdout)
    assert m["env"] == {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "pip": {}}


def test_a_broken_file_names_file_and_line(tmp_path):
    write(tmp_path, "good.py", "x = 1\n")
    write(tmp_path, "bad.py", "import quiver\n\ndef f(:\n    pass\n")
    r = run_discover(tmp_path)
    assert r.returncode == 1
    assert f"{tmp_path / 'bad.py'}:3" in r.stderr and "SyntaxError" in r.stderr


def test_an_exception_at_import_names_file_and_line(tmp_path):
    write(tmp_path, "boom.py", "import quiver\n\n\nraise RuntimeError('no config')\n")
    r = run_discover(tmp_path)
    assert r.returncode == 1
    assert f"{tmp_path / 'boom.py'}:4" in r.stderr and "RuntimeError: no config" in r.stderr


def test_a_parameter_without_a_parent_is_refused(tmp_path):
    write(tmp_path, "m.py", """
        import quiver

        @quiver.model()
        def f(data):
            return data
        """)
    r = run_discover(tmp_path)
    assert r.returncode == 1
    assert "parameter 'data'" in r.stderr and "m.py:5" in r.stderr


def test_discover_does_not_import_pyarrow(tmp_path):
    write(tmp_path, "m.py", """
        import sys, quiver

        @quiver.model()
        def f(t=quiver.Model("src")):
            return t

        assert "pyarrow" not in sys.modules
        """)
    r = run_discover(tmp_path)
    assert r.returncode == 0, r.stderr


def test_discover_usage_errors(tmp_path):
    r = run_discover(tmp_path / "missing")
    assert r.returncode == 1 and "not a folder" in r.stderr
