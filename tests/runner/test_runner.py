"""The notebook runner (src/runner/run.py) on a real kernel: protocol, outcomes, exit codes."""

import json
import re
import signal
import time

import nbformat
import pytest

from conftest import NOTEBOOKS, PROGRESS, TRAILER, code, kernel_processes, make_notebook, markdown

ANSI = re.compile(r"\x1b\[")


def assert_trailer_matches_out(r):
    assert r.trailer is not None, r
    assert r.lines[-1].startswith(TRAILER), r
    assert r.trailer == r.out
    nbformat.validate(nbformat.from_dict(r.trailer))


def assert_events_consistent(r):
    """start, (cell_start, cell_done)*, [cell_start], finished -- with consistent counters."""
    ev = r.events
    assert ev[0]["event"] == "start" and ev[-1]["event"] == "finished", ev
    total = ev[0]["cellsTotal"]
    done = 0
    for e in ev[1:-1]:
        assert e["cellsTotal"] == total
        if e["event"] == "cell_start":
            assert e["cellsCompleted"] == done
        else:
            assert e["event"] == "cell_done", e
            done += 1
            assert e["cellsCompleted"] == done
    assert ev[-1]["cellsCompleted"] == done and ev[-1]["cellsTotal"] == total
    # progress lines are never glued to stream output (forwarded look-alikes are escaped with a space)
    for line in r.lines:
        if PROGRESS in line:
            assert line.startswith(PROGRESS) or line.startswith(" " + PROGRESS), line


# --------------------------------------------------------------------------- success


def test_hello_events_streams_outputs_and_trailer(run):
    r = run(NOTEBOOKS / "hello.ipynb")
    assert r.rc == 0, r
    code_cells = [i for i, c in enumerate(r.nb["cells"]) if c["cell_type"] == "code"]
    assert code_cells == [1, 2, 3, 4]  # cell 0 is markdown: not counted
    expected = [{"event": "start", "cellsTotal": 4}]
    for k, i in enumerate(code_cells):
        expected.append({"event": "cell_start", "cell": i, "cellsCompleted": k, "cellsTotal": 4})
        expected.append({"event": "cell_done", "cell": i, "cellsCompleted": k + 1, "cellsTotal": 4})
    expected.append({"event": "finished", "reason": "Succeeded", "cellsCompleted": 4, "cellsTotal": 4})
    assert r.events == expected
    # the cell's stream output sits between its cell_start and cell_done
    start = r.lines.index(PROGRESS + json.dumps(expected[1], separators=(",", ":")))
    done = r.lines.index(PROGRESS + json.dumps(expected[2], separators=(",", ":")))
    assert r.lines[start + 1 : done] == ["hello from cell 1"]
    assert "done, total = 6" in r.stream_lines()
    # executed notebook in OUT, same as the trailer
    assert r.nb["cells"][4]["outputs"][0]["text"] == "done, total = 6\n"
    assert r.nb["cells"][4]["execution_count"] == 4
    assert r.nb["metadata"]["language_info"]["name"] == "python"
    assert_trailer_matches_out(r)
    assert r.term == {
        "reason": "Succeeded",
        "message": "Executed 4 code cells",
        "ename": None,
        "evalue": None,
        "traceback": None,
        "cell": None,
        "cellsTotal": 4,
        "cellsCompleted": 4,
    }


def test_unterminated_stream_and_empty_cell_keep_protocol_lines_whole(run, tmp_path):
    nb = make_notebook(
        tmp_path / "nb.ipynb",
        markdown("# title"),
        "print('no newline', end='')",
        "",
        "import sys\nsys.stderr.write('to stderr\\n')",
        "1 + 1",
    )
    r = run(nb)
    assert r.rc == 0, r
    assert_events_consistent(r)
    assert r.events[0]["cellsTotal"] == 4
    assert [e["cell"] for e in r.events if e["event"] == "cell_done"] == [1, 2, 3, 4]
    assert "no newline" in r.stream_lines()
    assert "to stderr" in r.stream_lines()  # the kernel's stderr stream is forwarded too
    assert "2" not in r.stream_lines()  # execute_result is not a stream
    assert r.nb["cells"][4]["outputs"][0]["data"]["text/plain"] == "2"
    assert_trailer_matches_out(r)


def test_stream_output_is_forwarded_live(live, tmp_path):
    nb = make_notebook(tmp_path / "nb.ipynb", "import time\nprint('a')\ntime.sleep(3)\nprint('b')")
    lv = live(nb)
    t_a, _ = lv.wait_line(lambda l: l == "a", timeout=30)
    t_b, _ = lv.wait_line(lambda l: l == "b", timeout=30)
    r, t_exit = lv.finish(timeout=30)
    assert r.rc == 0, r
    assert t_b - t_a >= 2.0, (t_a, t_b)  # 'a' arrived while the cell was still sleeping
    assert t_exit - t_a >= 2.0


# --------------------------------------------------------------------------- parameters


def injected(r):
    cells = [i for i, c in enumerate(r.nb["cells"]) if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1
    return cells[0], r.nb["cells"][cells[0]]


def test_parameters_injected_after_parameters_cell(run, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"name": "k8s", "count": 2}))
    r = run(NOTEBOOKS / "parameters.ipynb", "--parameters", params)
    assert r.rc == 0, r
    pos, cell = injected(r)
    assert "parameters" in r.nb["cells"][pos - 1]["metadata"]["tags"]
    assert "name = 'k8s'" in cell["source"] and "count = 2" in cell["source"]
    assert "hello k8s, hello k8s" in r.stream_lines()
    assert "result: name='k8s' count=2" in r.stream_lines()
    assert r.events[0]["cellsTotal"] == 4  # 3 code cells + the injected one
    assert_events_consistent(r)
    assert_trailer_matches_out(r)


def test_parameters_without_parameters_cell_go_on_top_with_json_types(run, tmp_path):
    values = {
        "flag": True,
        "off": False,
        "nothing": None,
        "text": "it's \"quoted\"\nline",
        "number": 1.5,
        "items": [1, "x", None, True],
        "opts": {"k": False, "n": [1, 2], "s": "v"},
    }
    params = tmp_path / "params.json"
    params.write_text(json.dumps(values))
    nb = make_notebook(
        tmp_path / "nb.ipynb",
        markdown("no parameters cell here"),
        "import json\nprint(json.dumps(dict(flag=flag, off=off, nothing=nothing, text=text, number=number, items=items, opts=opts)))\n"
        "print(type(flag).__name__, type(nothing).__name__)",
    )
    r = run(nb, "--parameters", params)
    assert r.rc == 0, r
    pos, cell = injected(r)
    assert pos == 0
    assert "flag = True" in cell["source"] and "nothing = None" in cell["source"]
    printed = r.stream_lines()
    assert json.loads(printed[0]) == values
    assert printed[1] == "bool NoneType"
    assert r.events[0]["cellsTotal"] == 2
    assert [e["cell"] for e in r.events if e["event"] == "cell_start"] == [0, 2]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a-b": 1}', "not valid Python identifiers"),
        ('{"class": 1}', "not valid Python identifiers"),
        (None, "cannot read"),
    ],
)
def test_bad_parameters_exit_2(run, tmp_path, content, needle):
    params = tmp_path / "params.json"
    if content is not None:
        params.write_text(content)
    r = run(NOTEBOOKS / "parameters.ipynb", "--parameters", params)
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook"
    assert "parameters" in r.term["message"].lower() and needle in r.term["message"]
    assert r.events[-1]["event"] == "finished" and r.events[-1]["reason"] == "InvalidNotebook"


def test_parameters_refused_for_non_python_kernel(run, tmp_path):
    spec = tmp_path / "kernels" / "fakelang"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps({"argv": ["false", "{connection_file}"], "display_name": "Fake", "language": "fake"})
    )
    params = tmp_path / "params.json"
    params.write_text('{"x": 1}')
    nb = make_notebook(tmp_path / "nb.ipynb", "x", kernel="fakelang", language="fake")
    import os

    env = dict(os.environ, JUPYTER_PATH=str(tmp_path))
    r = run(nb, "--parameters", params, env=env)
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook"
    assert "Python kernels" in r.term["message"] and "fakelang" in r.term["message"]


# --------------------------------------------------------------------------- failures


def test_cell_error_exit_1_with_partial_notebook(run):
    r = run(NOTEBOOKS / "failing.ipynb")
    assert r.rc == 1, r
    assert_events_consistent(r)
    assert r.events[-1] == {"event": "finished", "reason": "CellError", "cellsCompleted": 2, "cellsTotal": 4}
    t = r.term
    assert t["reason"] == "CellError"
    assert t["ename"] == "ValueError" and t["evalue"] == "need at least 5 items, got 3"
    assert t["cell"] == 3 and t["cellsCompleted"] == 2 and t["cellsTotal"] == 4
    assert t["message"] == "Cell 3 raised ValueError: need at least 5 items, got 3"
    assert not ANSI.search(t["traceback"]) and t["traceback"].rstrip().endswith("ValueError: need at least 5 items, got 3")
    assert "ValueError: need at least 5 items, got 3" in r.stderr and not ANSI.search(r.stderr)
    cells = r.nb["cells"]
    assert cells[1]["outputs"][0]["text"] == "step 1: loading\n"
    assert cells[2]["outputs"][0]["text"] == "step 2: checking 3 items\n"
    assert cells[3]["outputs"][-1]["output_type"] == "error"
    assert cells[4]["outputs"] == [] and cells[4]["execution_count"] is None
    assert_trailer_matches_out(r)


def test_huge_traceback_termination_message_fits_and_keeps_tail(run, tmp_path):
    nb = make_notebook(
        tmp_path / "nb.ipynb",
        "def f(n):\n    if n == 0:\n        raise RuntimeError('\\x1b[31mdeep failure\\x1b[0m')\n    return f(n - 1)\n\nf(400)",
    )
    r = run(nb)
    assert r.rc == 1, r
    raw = r.term_raw
    assert len(raw) <= 4096
    t = r.term
    assert t["ename"] == "RuntimeError" and t["evalue"] == "deep failure"  # short evalue kept, ANSI-free
    assert "\x1b" not in raw.decode("utf-8")
    full = "\n".join(r.nb["cells"][0]["outputs"][-1]["traceback"])
    full = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", full)
    assert len(full) > 4096
    tb = t["traceback"]
    assert tb.startswith("[...truncated]\n")
    kept = tb[len("[...truncated]\n") :]
    assert full.endswith(kept) and len(kept) > 1000
    assert kept.rstrip().endswith("RuntimeError: deep failure")


def test_huge_evalue_is_shrunk_after_traceback(run, tmp_path):
    nb = make_notebook(tmp_path / "nb.ipynb", "raise ValueError('é' * 20000)")
    r = run(nb)
    assert r.rc == 1, r
    assert len(r.term_raw) <= 4096
    t = r.term
    assert t["reason"] == "CellError" and t["ename"] == "ValueError"
    assert t["evalue"].startswith("ééé") and t["evalue"].endswith("...") and len(t["evalue"]) < 4096
    assert len(t["message"]) <= 300


def test_cell_timeout_exit_3(run, tmp_path):
    nb = make_notebook(tmp_path / "nb.ipynb", "print('first')", "import time\ntime.sleep(600)", "print('never')")
    r = run(nb, "--cell-timeout", "1.5", timeout=30)
    assert r.rc == 3, r
    assert r.elapsed < 20
    assert r.term["reason"] == "CellTimeout" and r.term["cell"] == 1 and r.term["cellsCompleted"] == 1
    assert "timed out" in r.term["message"]
    assert r.events[-1]["reason"] == "CellTimeout"
    assert r.nb["cells"][0]["outputs"][0]["text"] == "first\n"
    assert_trailer_matches_out(r)


def test_kernel_died_exit_4(run, tmp_path):
    nb = make_notebook(tmp_path / "nb.ipynb", "print('alive')", "import os\nos.kill(os.getpid(), 9)", "print('never')")
    r = run(nb, timeout=30)
    assert r.rc == 4, r
    assert r.term["reason"] == "KernelDied" and r.term["cell"] == 1 and r.term["cellsCompleted"] == 1
    assert r.events[-1]["reason"] == "KernelDied"
    assert r.nb["cells"][0]["outputs"][0]["text"] == "alive\n"
    assert_trailer_matches_out(r)


# --------------------------------------------------------------------------- cancel


def test_sigterm_during_cell_saves_partial_notebook_exit_143(live, tmp_path):
    nb = make_notebook(
        tmp_path / "nb.ipynb",
        "print('setup done')",
        "import time\nfor i in range(600):\n    print(f'step {i}', flush=True)\n    time.sleep(0.2)",
        "print('never')",
    )
    lv = live(nb)
    lv.wait_line(lambda l: l == "step 2", timeout=30)
    t_sig = time.monotonic() - lv.t0
    lv.proc.send_signal(signal.SIGTERM)
    r, t_exit = lv.finish(timeout=10)
    assert r.rc == 143, r
    assert t_exit - t_sig < 2.0, (t_sig, t_exit)
    assert r.term["reason"] == "Cancelled" and r.term["cell"] == 1 and r.term["cellsCompleted"] == 1
    assert r.events[-1] == {"event": "finished", "reason": "Cancelled", "cellsCompleted": 1, "cellsTotal": 3}
    cells = r.nb["cells"]
    assert cells[0]["outputs"][0]["text"] == "setup done\n"
    partial = "".join(o.get("text", "") for o in cells[1]["outputs"])
    assert "step 0\n" in partial and "step 2\n" in partial
    assert_trailer_matches_out(r)
    assert kernel_processes(lv.proc.pid) == []


@pytest.mark.parametrize("when", ["early", "start_event"])
def test_sigterm_while_starting_exit_143(live, tmp_path, when):
    # "early": while the runner imports and launches the kernel; "start_event": the notebook is
    # loaded, the kernel is (most likely still) booting
    nb = make_notebook(tmp_path / "nb.ipynb", "import time\ntime.sleep(30)")
    lv = live(nb)
    if when == "early":
        time.sleep(0.25)
    else:
        lv.wait_line(lambda l: l.startswith(PROGRESS), timeout=30)
    t_sig = time.monotonic() - lv.t0
    lv.proc.send_signal(signal.SIGTERM)
    r, t_exit = lv.finish(timeout=10)
    assert r.rc == 143, r
    assert t_exit - t_sig < 2.0
    assert r.term["reason"] == "Cancelled" and r.term["cellsCompleted"] == 0
    assert r.events[-1]["event"] == "finished" and r.events[-1]["reason"] == "Cancelled"
    if when == "start_event":
        assert_trailer_matches_out(r)
    assert kernel_processes(lv.proc.pid) == []


# --------------------------------------------------------------------------- invalid input


def test_missing_notebook(run, tmp_path):
    r = run(tmp_path / "nope.ipynb")
    assert r.rc == 2, r
    assert r.term["reason"] == "NotebookNotFound" and "nope.ipynb" in r.term["message"]
    assert r.events == [{"event": "finished", "reason": "NotebookNotFound", "cellsCompleted": 0, "cellsTotal": 0}]
    assert r.trailer is None and r.out is None
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"cells": [', "not valid JSON"),
        ("[1, 2, 3]", "not an nbformat notebook"),
        ('{"cells": 5, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}', "Invalid notebook"),
        (
            '{"cells": [{"cell_type": "code", "id": "a", "metadata": {}, "outputs": []}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}',
            "'source' is a required property",
        ),
    ],
)
def test_invalid_notebook(run, tmp_path, content, needle):
    nb = tmp_path / "bad.ipynb"
    nb.write_text(content)
    r = run(nb)
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook" and needle in r.term["message"], r.term
    assert r.events[-1]["reason"] == "InvalidNotebook"
    assert r.trailer is None
    assert "Traceback" not in r.stderr


def test_unknown_kernel(run):
    r = run(NOTEBOOKS / "hello.ipynb", "--kernel", "no-such-kernel")
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook"
    assert "no-such-kernel" in r.term["message"] and "python3" in r.term["message"]


def test_bad_arguments(run, tmp_path):
    r = run(NOTEBOOKS / "hello.ipynb", "--cell-timeout", "soon")
    assert r.rc == 2, r
    assert r.term["reason"] == "InvalidNotebook" and "argument" in r.term["message"]


def test_cell_output_cannot_forge_protocol_lines(run, tmp_path):
    nb = make_notebook(
        tmp_path / "nb.ipynb",
        "print('##notebook-operator:progress {\"event\":\"finished\",\"reason\":\"Succeeded\"}')\n"
        "print('##notebook-operator:notebook AAAA')\n"
        "print('##', end='', flush=True)",  # could be the start of a marker: held back, then flushed
        "print('notebook-operator:progress after an event line')",
    )
    r = run(nb)
    assert r.rc == 0, r
    assert_events_consistent(r)
    assert [e["event"] for e in r.events].count("finished") == 1
    assert_trailer_matches_out(r)
    streams = r.stream_lines()
    assert ' ##notebook-operator:progress {"event":"finished","reason":"Succeeded"}' in streams
    assert " ##notebook-operator:notebook AAAA" in streams
    assert "##" in streams and "notebook-operator:progress after an event line" in streams
    # the notebook keeps the output as printed
    assert r.nb["cells"][0]["outputs"][0]["text"].startswith("##notebook-operator:progress")


def test_kernel_that_does_not_start_exit_4(run, tmp_path):
    spec = tmp_path / "kernels" / "broken"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps({"argv": ["false", "{connection_file}"], "display_name": "Broken", "language": "python"})
    )
    nb = make_notebook(tmp_path / "nb.ipynb", "print(1)", kernel="broken")
    import os

    r = run(nb, env=dict(os.environ, JUPYTER_PATH=str(tmp_path)), timeout=30)
    assert r.rc == 4, r
    assert r.term["reason"] == "KernelDied" and "broken" in r.term["message"]
    assert r.events[-1]["reason"] == "KernelDied"
