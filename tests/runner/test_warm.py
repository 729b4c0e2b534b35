"""The warm runner (`run.py --warm KERNEL`): the local backend's spare, handed its run on stdin."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import RUNNER, Result, make_notebook


def spare(cwd):
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "--warm", "python3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=dict(os.environ, NOTEBOOK_OPERATOR_RUNNER_TRACE="1"),
    )


def wait_idle(proc, timeout=60):
    """Reads stderr until the spare says it waits for a run (its kernel is then ready)."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if b"warm: waiting for a run" in line:
            return
    raise AssertionError("the spare never became idle: %r" % seen)


def hand_over(proc, run_dir, *argv, timeout=60):
    go = json.dumps({"cwd": str(run_dir), "argv": list(argv)}) + "\n"
    stdout, stderr = proc.communicate(go.encode(), timeout=timeout)
    return Result(
        proc.returncode,
        stdout.decode("utf-8", "replace"),
        stderr.decode("utf-8", "replace"),
        run_dir / "term.json",
        run_dir / "out.ipynb",
        0.0,
    )


def test_a_spare_runs_the_notebook_it_is_handed_in_the_folder_it_is_given(tmp_path):
    idle, run_dir = tmp_path / "idle", tmp_path / "run"
    idle.mkdir()
    run_dir.mkdir()
    p = spare(idle)
    wait_idle(p)
    # written after the spare is ready: the notebook is read when the run is handed over
    make_notebook(
        run_dir / "in.ipynb",
        "import os; print('cwd', os.getcwd())",
        "print('leak', globals().get('leak', 'none')); leak = 1",
    )
    r = hand_over(p, run_dir, "--notebook", "in.ipynb", "--output", "out.ipynb", "--termination-log", "term.json")
    assert r.rc == 0, r
    assert r.term["reason"] == "Succeeded", r
    assert "cwd %s" % os.path.realpath(run_dir) in r.stream_lines(), r
    assert "leak none" in r.stream_lines(), r
    assert [e["event"] for e in r.events][0] == "start" and r.events[-1]["event"] == "finished", r
    assert r.out["cells"][0]["outputs"], "the executed notebook is written in the run's folder"


def test_a_notebook_for_another_kernel_gets_a_fresh_one(tmp_path):
    p = spare(tmp_path)
    wait_idle(p)
    make_notebook(tmp_path / "in.ipynb", "print('ran')", kernel="no-such-kernel")
    r = hand_over(p, tmp_path, "--notebook", "in.ipynb", "--output", "out.ipynb", "--termination-log", "term.json")
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook" and "no-such-kernel" in r.term["message"], r


def test_a_spare_ends_quietly_on_sigterm_and_on_eof_and_reports_a_bad_line(tmp_path):
    p = spare(tmp_path)
    wait_idle(p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143, "a signal before the run is read is a cancel, never a success"
    assert not (tmp_path / "term.json").exists(), "a spare without a run reports nothing"

    p = spare(tmp_path)
    wait_idle(p)
    p.stdin.close()
    assert p.wait(timeout=30) == 0

    p = spare(tmp_path)
    wait_idle(p)
    _, stderr = p.communicate(b"not json\n", timeout=30)
    assert p.returncode == 5
    assert b"invalid run line" in stderr
