"""One catalog connection per command (Store.session), and writers are not starved by it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from scdrugmap.store.catalog import Store
from scdrugmap.store.connections import state_for

ROOT = Path(__file__).resolve().parents[1]


def _store(tmp_path: Path) -> Store:
    st = Store.open(tmp_path / "store", create=True)
    with st.transaction() as con:
        con.execute("INSERT INTO meta VALUES ('probe', '0')")
    return st


def test_a_session_opens_one_connection_for_many_reads(tmp_path: Path) -> None:
    st = _store(tmp_path)
    state = state_for(st.catalog_path)
    before = state.opened
    for _ in range(20):
        st.query("SELECT value FROM meta WHERE key = 'probe'")
    assert state.opened - before == 20  # outside a session: one per query
    before = state.opened
    with st.session():
        for _ in range(20):
            assert st.query("SELECT value FROM meta WHERE key = 'probe'")["value"].iloc[0] == "0"
        with st.connect(read_only=True) as con:
            assert con.execute("SELECT 1").fetchone() == (1,)
    assert state.opened - before == 1
    assert state.con is None  # closed with the session


def test_writes_inside_a_session_are_seen_by_its_next_read(tmp_path: Path) -> None:
    st = _store(tmp_path)
    state = state_for(st.catalog_path)
    with st.session():
        assert st.query("SELECT value FROM meta WHERE key = 'probe'")["value"].iloc[0] == "0"
        for i in range(1, 4):
            with st.transaction() as con:
                con.execute("UPDATE meta SET value = ? WHERE key = 'probe'", [str(i)])
            assert st.query("SELECT value FROM meta WHERE key = 'probe'")["value"].iloc[0] == str(i)
        assert state.mode == "ro"
    # a failed transaction inside a session rolls back and leaves the session usable
    with st.session():
        try:
            with st.transaction() as con:
                con.execute("UPDATE meta SET value = 'x' WHERE key = 'probe'")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert st.query("SELECT value FROM meta WHERE key = 'probe'")["value"].iloc[0] == "3"


WRITER = """
import sys, time
from scdrugmap.store import Store
st = Store(sys.argv[1])
t = time.monotonic()
with st.transaction() as con:
    con.execute("UPDATE meta SET value = 'written' WHERE key = 'probe'")
print(f"{time.monotonic() - t:.2f}", flush=True)
"""


def test_a_reading_session_steps_aside_for_a_writer(tmp_path: Path) -> None:
    st = _store(tmp_path)
    with st.session():
        st.query("SELECT 1")  # the session now holds a read-only connection
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(st.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        seen = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a command's reads between its compute steps
            seen = st.query("SELECT value FROM meta WHERE key = 'probe'")["value"].iloc[0]
            if seen == "written":
                break
            time.sleep(0.2)
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert seen == "written"
    assert float(out) < 30  # it did not wait for the session to end
