"""The runner's uploads to the s3 results store (--results): presigned PUTs with urllib, the
notebook after every cell, then the HTML report and the log; failures reported, never fatal."""

import hashlib
import http.server
import json
import socket
import threading

import pytest

from conftest import code, make_notebook

RESULTS = "##notebook-operator:results "


class Store:
    """A loopback HTTP server that keeps every PUT, in order (what a presigned URL receives)."""

    def __init__(self):
        self.puts = []
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                n = int(self.headers.get("Content-Length") or 0)
                store.puts.append((self.path, self.headers.get("Content-Type"), self.rfile.read(n)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def urls(self):
        base = "http://127.0.0.1:%d/bucket/ns/run/" % self.port
        return {"notebook": base + "notebook.ipynb?sig=1", "report": base + "report.html?sig=2", "log": base + "log.txt?sig=3"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()


def reports(r):
    return [json.loads(l[len(RESULTS):]) for l in r.lines if l.startswith(RESULTS)]


def test_the_notebook_after_every_cell_then_report_and_log(run, tmp_path, store):
    nb = make_notebook(tmp_path / "nb.ipynb", code("print('one')"), code("print('two')"))
    urls = tmp_path / "results.json"
    urls.write_text(json.dumps(store.urls()))
    r = run(nb, "--results", urls)
    assert r.rc == 0, r
    assert r.trailer is None, "with a results store there is no trailer"
    paths = [p.split("?")[0].rsplit("/", 1)[1] for p, _, _ in store.puts]
    assert paths == ["notebook.ipynb", "notebook.ipynb", "notebook.ipynb", "report.html", "log.txt"], paths
    final_nb = store.puts[2][2]
    assert final_nb == r.out_path.read_bytes(), "the last upload is the executed notebook, byte for byte"
    assert store.puts[3][1].startswith("text/html") and b"<html" in store.puts[3][2].lower()
    log = store.puts[4][2].decode()
    assert "one\n" in log and "two\n" in log and '"event":"finished"' in log
    rep = reports(r)
    final = [x for x in rep if x.get("final")]
    assert [x["object"] for x in final] == ["notebook", "report", "log"], rep
    assert all(x["ok"] for x in rep), rep
    assert final[0]["sha256"] == hashlib.sha256(final_nb).hexdigest()
    assert [x.get("cell") for x in rep if not x.get("final")] == [0, 1]


def test_an_unreachable_store_never_fails_the_notebook(run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    base = "http://127.0.0.1:%d/b/" % port
    urls = tmp_path / "results.json"
    urls.write_text(json.dumps({"notebook": base + "n", "report": base + "r", "log": base + "l"}))
    nb = make_notebook(tmp_path / "nb.ipynb", code("1"), code("2"))
    r = run(nb, "--results", urls)
    assert r.rc == 0, r
    rep = reports(r)
    final = [x for x in rep if x.get("final")]
    assert [x["object"] for x in final] == ["notebook", "report", "log"], rep
    assert not any(x["ok"] for x in rep), rep
    assert all(x["error"] for x in rep), rep
    # the per-cell uploads pause after a failure: one attempt for the cells, then the final one
    assert len([x for x in rep if x["object"] == "notebook"]) == 2, rep
    assert "not uploaded" in r.stderr


def test_an_unreadable_results_file_is_reported_for_every_object(run, tmp_path):
    nb = make_notebook(tmp_path / "nb.ipynb", code("1"))
    r = run(nb, "--results", tmp_path / "missing.json")
    assert r.rc == 0, r
    rep = reports(r)
    assert sorted(x["object"] for x in rep) == ["log", "notebook", "report"], rep
    assert all(not x["ok"] and "cannot read the results file" in x["error"] for x in rep), rep
