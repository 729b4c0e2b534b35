#!/usr/bin/env python3
"""notebook-operator runner: execute one Jupyter notebook and report on it.

    python3 run.py --notebook IN --output OUT [--parameters FILE] [--kernel NAME]
                   [--cell-timeout S] [--termination-log PATH]
    python3 run.py --warm KERNEL

A warm runner (``--warm``, the local backend's spare) launches the kernel KERNEL, imports
everything and finishes the kernel handshake, then waits for one line on stdin:
``{"cwd": DIR, "argv": [the arguments above]}``. It then changes into DIR (and so does the
kernel) and runs exactly as a cold runner given those arguments would; the notebook and the
parameters are read only then. A kernel other than KERNEL is launched afresh. A warm runner that
gets SIGTERM before it has read that line exits 143 (cancelled); one that gets EOF exits 0, and one
whose kernel dies exits 5; none of them reports anything.

Protocol (DESIGN.md section 6):

* stdout: the cells' own stream output (the kernel's stdout and stderr streams),
  forwarded raw and live, interleaved with progress lines
  ``##notebook-operator:progress <compact JSON>`` (events ``start``, ``cell_start``,
  ``cell_done``, ``finished``); the last line is the trailer
  ``##notebook-operator:notebook <base64(gzip(executed notebook JSON))>``.
  Progress lines and the trailer always start at the beginning of a line.
* OUT is rewritten (atomically) after every code cell and at the end.
* ``--termination-log`` receives, in every outcome, a JSON object of at most 4096
  bytes: reason, message, ename, evalue, traceback (ANSI-free, tail kept), cell,
  cellsTotal, cellsCompleted.
* Exit codes: 0 Succeeded, 1 CellError, 2 InvalidNotebook / NotebookNotFound
  (missing or invalid notebook, bad parameters, unknown kernel), 3 CellTimeout,
  4 KernelDied, 143 Cancelled (SIGTERM, or SIGINT).

Speed: the kernel process is launched as soon as the kernelspec is known, before
the heavy imports (asyncio, zmq, jupyter_client, nbformat, nbclient), so that it
boots while this process imports them. The outcome is reported before the kernel
is killed (SIGKILL to its process group, no graceful shutdown), and the process
ends with os._exit (no interpreter or event-loop teardown).

Dependencies: the standard library, jupyter_core, jupyter_client, nbformat and
nbclient, all present in the Jupyter docker-stacks images.
"""

import signal

_EARLY_SIGNALS = []


def _early_signal(signum, frame):
    # a signal before the run is set up: remembered, acted upon as soon as it is
    _EARLY_SIGNALS.append(signum)


signal.signal(signal.SIGTERM, _early_signal)
signal.signal(signal.SIGINT, _early_signal)

import base64  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import keyword  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_T0 = time.monotonic()
_TRACE = bool(os.environ.get("NOTEBOOK_OPERATOR_RUNNER_TRACE"))

PROGRESS_PREFIX = "##notebook-operator:progress "
TRAILER_PREFIX = "##notebook-operator:notebook "
RESULTS_PREFIX = "##notebook-operator:results "
TERMINATION_LIMIT = 4096
STARTUP_TIMEOUT = 60.0

EXIT_CODES = {
    "Succeeded": 0,
    "CellError": 1,
    "InvalidNotebook": 2,
    "NotebookNotFound": 2,
    "CellTimeout": 3,
    "KernelDied": 4,
    "Cancelled": 143,
}

_ANSI_RE = re.compile(
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL / ST
    r"|\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
)


def trace(label):
    """Timing trace on stderr (NOTEBOOK_OPERATOR_RUNNER_TRACE=1)."""
    if _TRACE:
        err("[runner +%.3fs] %s" % (time.monotonic() - _T0, label))


def strip_ansi(text):
    return _ANSI_RE.sub("", text or "")


def first_line(text, limit=300):
    text = strip_ansi(str(text)).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class InputError(Exception):
    """Invalid input (exit 2)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Outcome(Exception):
    """How the run ended."""

    def __init__(self, reason, message, ename=None, evalue=None, traceback=None, cell=None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.cell = cell


# --------------------------------------------------------------------------- output


class Stdout:
    """Unbuffered writer on stdout that knows whether it is at the start of a line.

    Forwarded cell output can not forge protocol lines: a forwarded line that starts with
    ``##notebook-operator:`` is written with a leading space (a trailing partial line that could
    still become one is held back until the next chunk or the next protocol line)."""

    MARK = "##notebook-operator:"

    def __init__(self):
        self.at_line_start = True
        self.pending = ""  # held-back start of a line that may turn out to be MARK
        self.broken = False
        self.stream = getattr(sys.stdout, "buffer", None)
        self.tee = None  # the full log, uploaded at the end (--results)

    def _write(self, data):
        self.tee_write(data)
        if self.broken or self.stream is None:
            return
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            self.broken = True

    def tee_write(self, data):
        if self.tee is not None:
            try:
                self.tee.write(data)
                self.tee.flush()
            except (OSError, ValueError):
                self.tee = None

    def raw(self, text):
        """Forward cell output as is (apart from the escaping above)."""
        text = self.pending + text
        self.pending = ""
        if not text:
            return
        parts = text.split("\n")
        for i, part in enumerate(parts):
            if (i > 0 or self.at_line_start) and part.startswith(self.MARK):
                parts[i] = " " + part
        last = parts[-1]
        if (len(parts) > 1 or self.at_line_start) and last and self.MARK.startswith(last):
            self.pending = last
            parts[-1] = ""
        out = "\n".join(parts)
        if out:
            # state first: a signal handler that interrupts the write then errs on the safe side
            self.at_line_start = out.endswith("\n")
            self._write(out.encode("utf-8", "replace"))

    def line(self, text):
        """A protocol line, always on a line of its own."""
        if self.pending:  # (only ever held at the start of a line)
            prefix = self.pending + "\n"
        else:
            prefix = "" if self.at_line_start else "\n"
        data = prefix + text + "\n"
        self.pending = ""
        self.at_line_start = True
        self._write(data.encode("utf-8", "replace"))

    def event(self, **payload):
        self.line(PROGRESS_PREFIX + json.dumps(payload, separators=(",", ":")))


STDOUT = Stdout()


def err(text):
    line = text if text.endswith("\n") else text + "\n"
    STDOUT.tee_write(line.encode("utf-8", "replace"))
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


# --------------------------------------------------------------------------- arguments


class _ArgError(Exception):
    pass


def parse_args(argv):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise _ArgError(message)

    p = Parser(prog="run.py", description="Execute a Jupyter notebook (notebook-operator runner).")
    p.add_argument("--notebook", required=True, help="input notebook (.ipynb)")
    p.add_argument("--output", required=True, help="executed notebook, rewritten after every cell")
    p.add_argument("--parameters", help="JSON object; injected as a cell tagged injected-parameters")
    p.add_argument("--kernel", help="kernel name (default: the notebook's kernelspec, else python3)")
    p.add_argument("--cell-timeout", type=float, help="per-cell timeout in seconds (<= 0: none)")
    p.add_argument("--termination-log", help="where to write the termination message (JSON)")
    p.add_argument("--results", help="JSON object of presigned PUT URLs: notebook, report, log (s3 results store)")
    return p.parse_args(argv)


def scan_termination_log(argv):
    """--termination-log, found even when the rest of the command line is invalid."""
    for i, a in enumerate(argv):
        if a == "--termination-log" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--termination-log="):
            return a.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- parameters


def py_literal(v):
    """Python source for a JSON-decoded value."""
    if v is None or isinstance(v, (bool, int, str)):
        return repr(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "-float('inf')"
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(py_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(repr(k) + ": " + py_literal(x) for k, x in v.items()) + "}"
    raise ValueError("unsupported value %r" % (v,))


def load_parameters(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError("InvalidNotebook", "Invalid parameters: cannot read %s: %s" % (path, e.strerror or e))
    try:
        params = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError("InvalidNotebook", "Invalid parameters: %s is not valid JSON: %s" % (path, e))
    if not isinstance(params, dict):
        raise InputError(
            "InvalidNotebook", "Invalid parameters: expected a JSON object, got %s" % type(params).__name__
        )
    bad = [k for k in params if not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise InputError(
            "InvalidNotebook",
            "Invalid parameters: not valid Python identifiers: %s" % ", ".join(repr(k) for k in bad[:10]),
        )
    return params


def parameters_source(params):
    return "\n".join(["# Parameters"] + ["%s = %s" % (k, py_literal(v)) for k, v in params.items()])


# --------------------------------------------------------------------------- notebook


def read_notebook_json(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError("NotebookNotFound", "Notebook not found: %s" % path)
    except IsADirectoryError:
        raise InputError("InvalidNotebook", "Notebook path is a directory: %s" % path)
    except OSError as e:
        raise InputError("InvalidNotebook", "Cannot read the notebook %s: %s" % (path, e.strerror or e))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError("InvalidNotebook", "Invalid notebook %s: not UTF-8 (%s)" % (path, e))
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputError("InvalidNotebook", "Invalid notebook %s: not valid JSON: %s" % (path, e))
    if not isinstance(data, dict) or not isinstance(data.get("nbformat"), int):
        raise InputError("InvalidNotebook", "Invalid notebook %s: not an nbformat notebook" % path)
    return text, data


def new_cell_id(taken):
    import uuid

    while True:
        cid = uuid.uuid4().hex[:8]
        if cid not in taken:
            return cid


def to_notebook(text, path):
    """Parse and validate with nbformat; returns an nbformat 4.5 NotebookNode (cell ids filled in)."""
    import warnings

    import nbformat

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4)
            if nb.get("nbformat_minor", 0) < 5:
                nb["nbformat_minor"] = 5
            seen = set()
            for cell in nb.cells:
                cid = cell.get("id")
                if not isinstance(cid, str) or not cid or cid in seen:
                    cell["id"] = new_cell_id(seen)
                seen.add(cell["id"])
            nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - nbformat raises many kinds
        message = getattr(e, "message", None)
        if isinstance(message, str) and message:
            where = "".join("[%r]" % p for p in (getattr(e, "absolute_path", None) or []))
            detail = "schema validation failed: %s%s" % (first_line(message), " at " + where if where else "")
        else:
            detail = "not a valid nbformat notebook (%s: %s)" % (type(e).__name__, first_line(e))
        raise InputError("InvalidNotebook", "Invalid notebook %s: %s" % (path, detail))
    return nb


def inject_parameters(nb, params):
    """papermill convention: a new cell tagged injected-parameters right after the first
    cell tagged parameters, or at the top when there is none."""
    from nbformat import NotebookNode

    taken = {c.get("id") for c in nb.cells}
    cell = NotebookNode(
        cell_type="code",
        id="injected-parameters" if "injected-parameters" not in taken else new_cell_id(taken),
        execution_count=None,
        metadata=NotebookNode(tags=["injected-parameters"]),
        outputs=[],
        source=parameters_source(params),
    )
    pos = 0
    for i, c in enumerate(nb.cells):
        if "parameters" in (c.get("metadata", {}).get("tags") or []):
            pos = i + 1
            break
    nb.cells.insert(pos, cell)


def notebook_bytes(nb):
    from nbformat.v4 import writes_json  # what nbformat.write uses, without re-validating

    s = writes_json(nb)
    return (s if s.endswith("\n") else s + "\n").encode("utf-8")


def write_atomic(path, data):
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)), ".%s.%d.tmp" % (os.path.basename(path), os.getpid())
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- termination message


def termination_json(info):
    """Serialize; when over the limit shrink the traceback (keeping its tail), then evalue,
    message and ename (keeping their heads)."""
    info = dict(info)

    def fits():
        return len(json.dumps(info, ensure_ascii=False).encode("utf-8")) <= TERMINATION_LIMIT

    def shrink(key, keep):
        full = info.get(key) or ""
        lo, hi = 0, len(full)
        while lo < hi:  # the largest kept length that fits
            mid = (lo + hi + 1) // 2
            info[key] = keep(full, mid)
            if fits():
                lo = mid
            else:
                hi = mid - 1
        info[key] = keep(full, lo)

    if not fits() and info.get("traceback"):
        shrink("traceback", lambda s, n: "[...truncated]\n" + s[len(s) - n :] if n else "[...truncated]")
    for key in ("evalue", "message", "ename"):
        if not fits() and info.get(key):
            shrink(key, lambda s, n: s[:n] + "...")
    if not fits():
        info["traceback"] = None
    return json.dumps(info, ensure_ascii=False)


# --------------------------------------------------------------------------- kernel


class KernelSpec:
    def __init__(self, name, argv, language, env=None, interrupt_mode="signal", resource_dir=None):
        self.name = name
        self.argv = argv
        self.language = language or ""
        self.env = env or {}
        self.interrupt_mode = interrupt_mode or "signal"
        self.resource_dir = resource_dir


def kernel_dirs():
    try:
        from jupyter_core.paths import jupyter_path

        dirs = list(jupyter_path("kernels"))
    except Exception:  # noqa: BLE001
        home = os.path.expanduser("~")
        dirs = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
        dirs = [os.path.join(p, "kernels") for p in dirs]
        dirs.append(os.path.join(os.environ.get("JUPYTER_DATA_DIR") or os.path.join(home, ".local/share/jupyter"), "kernels"))
        dirs += [os.path.join(sys.prefix, "share/jupyter/kernels"), "/usr/local/share/jupyter/kernels", "/usr/share/jupyter/kernels"]
    # jupyter_client also looks in IPython's legacy kernel directory
    dirs.append(os.path.join(os.environ.get("IPYTHONDIR") or os.path.expanduser("~/.ipython"), "kernels"))
    return dirs


def find_kernel_specs():
    """name (lower case) -> resource dir, or None for the native ipykernel; as jupyter_client does."""
    specs = {}
    for d in kernel_dirs():
        try:
            entries = sorted(os.listdir(d))
        except OSError:
            continue
        for f in entries:
            path = os.path.join(d, f)
            if os.path.isfile(os.path.join(path, "kernel.json")):
                specs.setdefault(f.lower(), path)
    if "python3" not in specs:
        import importlib.util

        if importlib.util.find_spec("ipykernel") is not None:
            specs["python3"] = None
    return specs


def get_kernel_spec(name):
    specs = find_kernel_specs()
    key = name.lower()
    if key not in specs:
        raise InputError(
            "InvalidNotebook",
            "Unknown kernel %r; available kernelspecs: %s" % (name, ", ".join(sorted(specs)) or "(none)"),
        )
    path = specs[key]
    if path is None:
        return KernelSpec(name, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "python")
    try:
        with open(os.path.join(path, "kernel.json"), "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        argv = d["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = d.get("env") or {}
        if not isinstance(env, dict):
            raise ValueError("env must be an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError("InvalidNotebook", "Invalid kernelspec %r in %s: %s" % (name, path, first_line(e)))
    return KernelSpec(name, argv, d.get("language"), env, d.get("interrupt_mode"), path)


class Kernel:
    """A kernel process launched directly (as jupyter_client's local provisioner does), so that
    it starts booting before this process has imported jupyter_client."""

    def __init__(self, spec):
        import tempfile

        self.spec = spec
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="nbop-kernel-")
        self.connection_file = os.path.join(self.dir, "kernel.json")
        # ipykernel: Unix sockets in a private directory (no ports, no TCP); other kernels: TCP on loopback.
        # A Unix socket path holds at most 107 bytes: under a deep TMPDIR, use TCP instead.
        use_ipc = any("ipykernel" in a for a in spec.argv) and len(os.path.join(self.dir, "k-99").encode()) < 100
        info = {
            "transport": "ipc" if use_ipc else "tcp",
            "ip": os.path.join(self.dir, "k") if use_ipc else "127.0.0.1",
            "key": os.urandom(16).hex(),
            "signature_scheme": "hmac-sha256",
            "kernel_name": spec.name,
        }
        names = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
        ports = range(1, 6) if use_ipc else _free_ports(5)
        info.update(zip(names, ports))
        self.info = info
        try:
            fd = os.open(self.connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
        except OSError:
            self.kill()
            raise

    def launch(self):
        import subprocess
        from string import Template

        spec = self.spec
        ns = {"connection_file": os.path.realpath(self.connection_file), "prefix": sys.prefix}
        if spec.resource_dir:
            ns["resource_dir"] = spec.resource_dir
        argv = [re.sub(r"\{([A-Za-z0-9_]+)\}", lambda m: str(ns.get(m.group(1), m.group())), a) for a in spec.argv]
        if argv[0] in ("python", "python%d" % sys.version_info[0], "python%d.%d" % sys.version_info[:2]):
            argv[0] = sys.executable
        argv = [os.path.expanduser(a) for a in argv]
        env = dict(os.environ)
        env.update({k: Template(str(v)).safe_substitute(os.environ) for k, v in spec.env.items()})
        if spec.language.lower().startswith("python"):
            env.pop("PYTHONEXECUTABLE", None)
        env["JPY_PARENT_PID"] = str(os.getpid())  # the kernel exits when this process is gone
        if argv[1:3] == ["-m", "ipykernel_launcher"] or "ipykernel" in " ".join(argv):
            argv.append("--HistoryManager.hist_file=:memory:")
        self.proc = subprocess.Popen(
            argv,
            preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL,
            # the kernel process's own fd 1 goes to our stderr: stdout carries only the protocol
            # and the cells' streams (which come over IOPub)
            stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: interrupt and kill reach its children too
            close_fds=True,
        )

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            try:
                self.proc.send_signal(signum)
            except OSError:
                pass

    def interrupt(self):
        if self.spec.interrupt_mode == "signal" and self.alive():
            self.signal(signal.SIGINT)

    def kill(self):
        """Immediately: SIGKILL to the process group (no shutdown request, no grace period)."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=1)
            except Exception:  # noqa: BLE001
                pass
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent():
    """In the kernel's child before exec: SIGKILL when this runner dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the kernel's own parent poller remains
        pass


def _free_ports(n):
    import socket

    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _has_fileno(stream):
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------- results store (s3)


class Results:
    """Uploads to the s3 results store through presigned PUT URLs (--results), with urllib only.

    The notebook is uploaded after every cell (a SIGKILL keeps the last saved state), then at the
    end with the HTML report and the full log. A failed upload never fails the notebook: it is
    reported as ``##notebook-operator:results {"object", "ok": false, "error"}`` and the
    controller puts it in status.output.message. After a failure, per-cell uploads pause for
    RETRY_AFTER seconds so that an unreachable store does not slow every cell by a timeout."""

    TIMEOUT = 60.0  # per request
    RETRY_AFTER = 30.0
    OBJECTS = ("notebook", "report", "log")

    def __init__(self, urls, log_path):
        self.urls = urls
        self.log_path = log_path
        self.paused_until = 0.0

    @classmethod
    def load(cls, path, output):
        urls = {}
        problem = None
        try:
            with open(path, encoding="utf-8") as f:
                urls = json.load(f)
            if not isinstance(urls, dict) or not all(isinstance(urls.get(o), str) for o in cls.OBJECTS):
                problem, urls = "the results file %s does not name the three upload URLs" % path, {}
        except (OSError, ValueError) as e:
            problem = "cannot read the results file %s: %s" % (path, first_line(e))
        results = cls(urls, output + ".log")
        if problem:
            err("notebook-operator runner: %s; nothing will be uploaded" % problem)
            for o in cls.OBJECTS:
                results.report(o, False, error=problem, final=True)
            return None
        try:
            STDOUT.tee = open(results.log_path, "ab")
        except OSError as e:
            err("notebook-operator runner: cannot write the log file %s: %s" % (results.log_path, e))
        return results

    @staticmethod
    def report(obj, ok, **fields):
        payload = {"object": obj, "ok": ok}
        payload.update({k: v for k, v in fields.items() if v is not None})
        STDOUT.line(RESULTS_PREFIX + json.dumps(payload, separators=(",", ":")))

    def put(self, obj, data, content_type, final=False, cell=None):
        """PUT one object; reports the outcome. Returns True when the store took it."""
        import hashlib
        import urllib.error
        import urllib.request

        if not final and time.monotonic() < self.paused_until:
            return False
        req = urllib.request.Request(self.urls[obj], data=data, method="PUT")
        req.add_header("Content-Type", content_type)
        error = None
        try:
            with urllib.request.urlopen(req, timeout=self.TIMEOUT) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            body = b""
            try:
                body = e.read(300)
            except Exception:  # noqa: BLE001
                pass
            error = "HTTP %d %s %s" % (e.code, e.reason, first_line(body.decode("utf-8", "replace"), 200))
        except Exception as e:  # noqa: BLE001 - URLError, timeouts, resets: reported, never fatal
            error = first_line(getattr(e, "reason", None) or e, 200)
        if error is not None:
            self.paused_until = time.monotonic() + self.RETRY_AFTER
            if final:
                err("notebook-operator runner: %s not uploaded: %s" % (obj, error))
            self.report(obj, False, error=str(error), final=final or None, cell=cell)
            return False
        sha = hashlib.sha256(data).hexdigest()
        self.report(obj, True, bytes=len(data), sha256=sha, final=final or None, cell=cell)
        return True

    def report_html(self, nb):
        """The HTML report (nbconvert's HTMLExporter), or why there is none."""
        try:
            from nbconvert import HTMLExporter
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
            note = "nbconvert is not installed in the image (%s)" % first_line(e, 150)
            err("notebook-operator runner: no HTML report: %s" % note)
            self.report("report", False, skipped=True, error=note, final=True)
            return
        try:
            body, _ = HTMLExporter().from_notebook_node(nb)
        except Exception as e:  # noqa: BLE001
            note = "nbconvert could not render it: %s" % first_line(e, 200)
            err("notebook-operator runner: no HTML report: %s" % note)
            self.report("report", False, skipped=True, error=note, final=True)
            return
        self.put("report", body.encode("utf-8"), "text/html; charset=utf-8", final=True)

    def upload_log(self):
        tee, STDOUT.tee = STDOUT.tee, None  # what follows is not in the log
        try:
            if tee is not None:
                tee.close()
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError as e:
            self.report("log", False, error="cannot read the log file: %s" % first_line(e), final=True)
            return
        self.put("log", data, "text/plain; charset=utf-8", final=True)


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self):
        self.args = None
        self.termination_log = None
        self.params = None
        self.nb_text = None  # the input as read (for handing it back on a late input error)
        self.nb = None  # validated NotebookNode, executed in place
        self.cells_total = 0
        self.cells_completed = 0
        self.current_cell = None
        self.kernel = None
        self.launching = False  # while the kernel process is being spawned, a signal is deferred
        self.pending_signal = None
        self.finishing = False
        self.out_warned = False
        self.spare = False  # a warm runner waiting for its run: a signal just ends it
        self.kc = None  # the warm kernel's client and kernel_info reply, when it is reused
        self.ready_reply = None
        self.kernel_cwd = None  # where the reused warm kernel must change into
        self.results = None  # uploads to the s3 results store (--results)

    # ---- signals

    def on_signal(self, signum, frame):
        if self.spare:
            # Idle, or handed a run it has not read yet: either way a cancel (exit 143), never a
            # clean exit that would read as the run's success.
            self.exit_spare(EXIT_CODES["Cancelled"])
        if self.finishing:
            return
        if self.launching:
            self.pending_signal = signum
            return
        self.cancel(signum)

    def cancel(self, signum):
        name = signal.Signals(signum).name
        if self.current_cell is not None:
            msg = "Cancelled (%s) while executing cell %d" % (name, self.current_cell)
        elif self.kernel is not None and self.kernel.proc is not None:
            msg = "Cancelled (%s) while starting the kernel" % name
        else:
            msg = "Cancelled (%s) before the kernel started" % name
        if self.kernel is not None:
            self.kernel.interrupt()
        self.finish(Outcome("Cancelled", msg, cell=self.current_cell))

    # ---- outcome

    def save(self):
        """Rewrite OUT with the notebook; returns its bytes (None if there is no notebook)."""
        if self.nb is None:
            return None
        try:
            data = notebook_bytes(self.nb)
        except Exception as e:  # noqa: BLE001
            err("notebook-operator runner: cannot serialize the notebook: %s" % e)
            return None
        try:
            write_atomic(self.args.output, data)
        except OSError as e:
            if not self.out_warned:
                err("notebook-operator runner: cannot write %s: %s" % (self.args.output, e))
                self.out_warned = True
        return data

    def finish(self, outcome):
        """Report the outcome (OUT, termination message, finished event, trailer), then kill the
        kernel and exit. Never returns."""
        self.finishing = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
        trace("finishing: %s" % outcome.reason)
        reason = outcome.reason
        data = None
        try:
            if self.nb is None and self.nb_text is not None and reason != "Cancelled":
                # e.g. invalid parameters, unknown kernel, a kernel that does not start: hand back
                # the notebook as it was read, if it is valid
                try:
                    self.nb = to_notebook(self.nb_text, self.args.notebook)
                    self.cells_total = sum(1 for c in self.nb.cells if c.get("cell_type") == "code")
                except Exception:  # noqa: BLE001
                    self.nb = None
            data = self.save()
            tb = strip_ansi(outcome.traceback) if outcome.traceback else None
            info = {
                "reason": reason,
                "message": outcome.message,
                "ename": outcome.ename,
                "evalue": strip_ansi(outcome.evalue) if outcome.evalue is not None else None,
                "traceback": tb,
                "cell": outcome.cell,
                "cellsTotal": self.cells_total,
                "cellsCompleted": self.cells_completed,
            }
            if self.termination_log:
                try:
                    with open(self.termination_log, "w", encoding="utf-8") as f:
                        f.write(termination_json(info))
                except OSError as e:
                    err("notebook-operator runner: cannot write the termination log %s: %s" % (self.termination_log, e))
            if reason != "Succeeded":
                if tb:
                    err(tb)
                err("notebook-operator runner: %s: %s" % (reason, outcome.message))
            STDOUT.event(
                event="finished", reason=reason, cellsCompleted=self.cells_completed, cellsTotal=self.cells_total
            )
            if self.results is not None:
                self.upload_final(data)
            elif data is not None:
                STDOUT.line(TRAILER_PREFIX + base64.b64encode(gzip.compress(data, 6, mtime=0)).decode("ascii"))
            trace("outcome reported")
        finally:
            try:
                if self.kernel is not None:
                    self.kernel.kill()
                    trace("kernel killed")
            finally:
                os._exit(EXIT_CODES.get(reason, 4))

    def upload_final(self, data):
        """The s3 store instead of the trailer: the notebook, its HTML report, then the log."""
        r = self.results
        try:
            if data is not None:
                r.put("notebook", data, "application/x-ipynb+json", final=True)
                r.report_html(self.nb)
            else:
                r.report("notebook", False, skipped=True, error="the run ended before the notebook was read", final=True)
                r.report("report", False, skipped=True, error="no notebook to render", final=True)
            r.upload_log()
        except Exception as e:  # noqa: BLE001 - an upload never fails the notebook
            err("notebook-operator runner: uploading the results failed: %s" % first_line(e))
        trace("results uploaded")

    # ---- main

    def main(self, argv):
        if argv[:1] == ["--warm"]:
            self.warm_main(argv[1:])
            return

        def body():
            self.begin(argv)
            import asyncio

            asyncio.run(self.execute())

        self.guarded(body)

    def begin(self, argv):
        """Arguments, signals, inputs and the kernel: everything before the first cell."""
        self.termination_log = scan_termination_log(argv)
        try:
            self.args = parse_args(argv)
        except _ArgError as e:
            raise InputError("InvalidNotebook", "Invalid arguments: %s" % e)
        self.termination_log = self.args.termination_log
        if self.args.results:
            self.results = Results.load(self.args.results, self.args.output)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        if _EARLY_SIGNALS:
            self.cancel(_EARLY_SIGNALS[0])
        self.start()
        self.load()

    def guarded(self, body):
        """Runs body (which ends in an Outcome); every way out reports an outcome. Never returns."""
        try:
            body()
            raise Outcome("KernelDied", "Runner error: the execution ended without an outcome")
        except BaseException as e:  # noqa: BLE001 - never a bare traceback
            self.fail(e)

    def fail(self, e):
        if isinstance(e, InputError):
            self.finish(Outcome(e.reason, e.message))
        if isinstance(e, Outcome):
            self.finish(e)
        import traceback

        self.finish(
            Outcome(
                "KernelDied",
                "Runner error: %s: %s" % (type(e).__name__, first_line(e)),
                ename=type(e).__name__,
                evalue=str(e),
                traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)),
                cell=self.current_cell,
            )
        )

    # ---- warm start (the local backend's spare runner)

    def warm_main(self, argv):
        if len(argv) != 1:
            err("notebook-operator runner: --warm takes one kernel name")
            self.exit_spare(5)
        self.spare = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        if _EARLY_SIGNALS:
            self.exit_spare(EXIT_CODES["Cancelled"])
        try:
            self.kernel = Kernel(get_kernel_spec(argv[0]))
            self.kernel.launch()
        except Exception as e:  # noqa: BLE001
            err("notebook-operator runner: the spare kernel %r did not start: %s" % (argv[0], first_line(e)))
            self.exit_spare(5)
        import asyncio

        asyncio.run(self.warm())

    async def warm(self):
        try:
            self.kc, self.ready_reply = await self.connect()
        except BaseException as e:  # noqa: BLE001
            err("notebook-operator runner: the spare kernel is not ready: %s" % first_line(e))
            self.exit_spare(5)
        trace("warm: waiting for a run")
        go = await self.wait_go()
        self.spare = False
        try:
            os.chdir(go["cwd"])
            self.kernel_cwd = os.getcwd()
            trace("warm: run received")
            self.begin(go["argv"])
            await self.execute()
            raise Outcome("KernelDied", "Runner error: the execution ended without an outcome")
        except BaseException as e:  # noqa: BLE001
            self.fail(e)

    async def wait_go(self):
        """The run's line on stdin: {"cwd": ..., "argv": [...]}; exits when the kernel dies first."""
        import asyncio

        loop = asyncio.get_running_loop()
        got = loop.create_future()
        buf = bytearray()

        def readable():
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            buf.extend(chunk)
            if (not chunk or b"\n" in buf) and not got.done():
                got.set_result(None)

        loop.add_reader(0, readable)
        while not got.done():
            await asyncio.wait([got], timeout=1.0)
            if not self.kernel.alive():
                err("notebook-operator runner: the spare kernel exited while idle")
                self.exit_spare(5)
        loop.remove_reader(0)
        line = bytes(buf).split(b"\n", 1)[0]
        if not line:
            self.exit_spare(0)  # the server went away before a run came
        try:
            go = json.loads(line.decode("utf-8"))
            if not isinstance(go.get("cwd"), str) or not all(isinstance(a, str) for a in go.get("argv")):
                raise ValueError("cwd must be a string and argv a list of strings")
        except (ValueError, TypeError, AttributeError) as e:
            err("notebook-operator runner: invalid run line on stdin: %s" % first_line(e))
            self.exit_spare(5)
        return go

    def exit_spare(self, code):
        if self.kernel is not None:
            self.kernel.kill()
        os._exit(code)

    def start(self):
        """Read the inputs and launch the kernel (before the heavy imports)."""
        a = self.args
        self.nb_text, data = read_notebook_json(a.notebook)
        if a.parameters:
            self.params = load_parameters(a.parameters)
        ks = (data.get("metadata") or {}).get("kernelspec") if isinstance(data.get("metadata"), dict) else None
        name = a.kernel or (ks.get("name") if isinstance(ks, dict) else None) or "python3"
        if not isinstance(name, str):
            raise InputError("InvalidNotebook", "Invalid notebook: metadata.kernelspec.name is not a string")
        spec = get_kernel_spec(name)
        if self.params is not None and not spec.language.lower().startswith("python"):
            raise InputError(
                "InvalidNotebook",
                "Parameters can only be injected for Python kernels; kernel %r has language %r"
                % (name, spec.language),
            )
        trace("kernelspec %s: %s" % (name, spec.argv))
        if self.kernel is not None:
            if self.kernel.spec.name == name and self.kernel.alive():
                trace("warm kernel reused")
                return
            # the spare's kernel is not the one this notebook asks for: a fresh one
            self.kernel.kill()
            self.kernel, self.kc, self.ready_reply, self.kernel_cwd = None, None, None, None
        self.launching = True  # signals wait until the kernel is either launched or not
        try:
            self.kernel = Kernel(spec)
            self.kernel.launch()
        except Exception as e:  # noqa: BLE001
            self.launching = False
            raise Outcome("KernelDied", "Kernel %r failed to start: %s" % (name, first_line(e)))
        self.launching = False
        if self.pending_signal:
            self.cancel(self.pending_signal)
        trace("kernel launched")

    def load(self):
        """Validate the notebook, clear old outputs, inject the parameters, write OUT once."""
        import logging

        logging.getLogger("traitlets").setLevel(logging.CRITICAL)  # nbformat/nbclient chatter
        a = self.args
        nb = to_notebook(self.nb_text, a.notebook)
        for cell in nb.cells:
            if cell.get("cell_type") == "code":
                cell["outputs"] = []
                cell["execution_count"] = None
        if self.params is not None:
            inject_parameters(nb, self.params)
        try:
            write_atomic(a.output, notebook_bytes(nb))
        except OSError as e:
            raise InputError("InvalidNotebook", "Cannot write the output notebook %s: %s" % (a.output, e))
        self.nb = nb
        self.cells_total = sum(1 for c in nb.cells if c.get("cell_type") == "code")
        STDOUT.event(event="start", cellsTotal=self.cells_total)
        trace("notebook loaded")

    async def connect(self):
        """A client connected to our kernel, and the kernel's kernel_info reply."""
        from jupyter_client.asynchronous import AsyncKernelClient

        kernel = self.kernel

        class KernelClient(AsyncKernelClient):
            # liveness from the process we launched (nbclient polls it during execution)
            async def is_alive(self):
                return kernel.alive()

            _async_is_alive = is_alive

        kc = KernelClient()
        kc.load_connection_info(kernel.info)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        kc.allow_stdin = False
        trace("client imported and connected")
        reply = await self.wait_ready(kc)
        trace("kernel ready")
        # imported here, so that a warm runner has paid for them before its run comes
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401

        return kc, reply

    async def chdir_kernel(self, kc, path):
        """The warm kernel was started elsewhere: it moves into the run's folder, silently."""
        code = "__import__('os').chdir(%r)" % path
        msg_id = kc.execute(code, silent=True, store_history=False)
        from queue import Empty

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                msg = await kc.shell_channel.get_msg(timeout=1.0)
            except Empty:
                if not self.kernel.alive():
                    break
                continue
            if (msg.get("parent_header") or {}).get("msg_id") == msg_id:
                if (msg.get("content") or {}).get("status") == "ok":
                    return
                break
        raise Outcome("KernelDied", "The kernel could not change into the run's folder")

    async def execute(self):
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        class Client(NotebookClient):
            def output(self, outs, msg, display_id, cell_index):
                # record first, then forward live: what was forwarded is in the notebook, even if
                # SIGTERM arrives between the two
                out = super().output(outs, msg, display_id, cell_index)
                if msg.get("msg_type") == "stream":
                    STDOUT.raw((msg.get("content") or {}).get("text") or "")
                return out

        a = self.args
        timeout = a.cell_timeout if a.cell_timeout and a.cell_timeout > 0 else None
        if self.kc is not None:
            kc, reply = self.kc, self.ready_reply
            await self.chdir_kernel(kc, self.kernel_cwd)
        else:
            kc, reply = await self.connect()
        if "language_info" in reply.get("content", {}):
            self.nb.metadata["language_info"] = reply["content"]["language_info"]

        client = Client(self.nb, timeout_func=lambda cell: timeout, allow_errors=False, record_timing=True)
        client.kc = kc
        for index, cell in enumerate(self.nb.cells):
            if cell.get("cell_type") != "code":
                continue
            self.current_cell = index
            STDOUT.event(event="cell_start", cell=index, cellsCompleted=self.cells_completed, cellsTotal=self.cells_total)
            try:
                await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
            except CellTimeoutError:
                secs = ("%d" % timeout) if float(timeout or 0).is_integer() else ("%g" % timeout)
                raise Outcome("CellTimeout", "Cell %d timed out after %s s" % (index, secs), cell=index)
            except CellExecutionError as e:
                ename, evalue, tb = error_from_cell(cell, e)
                raise Outcome(
                    "CellError",
                    first_line("Cell %d raised %s: %s" % (index, ename, evalue)),
                    ename=ename,
                    evalue=evalue,
                    traceback=tb,
                    cell=index,
                )
            except DeadKernelError:
                raise Outcome("KernelDied", "The kernel died while executing cell %d" % index, cell=index)
            self.cells_completed += 1
            self.current_cell = None
            STDOUT.event(event="cell_done", cell=index, cellsCompleted=self.cells_completed, cellsTotal=self.cells_total)
            data = self.save()
            if self.results is not None and data is not None:
                self.results.put("notebook", data, "application/x-ipynb+json", cell=index)
        try:
            client.set_widgets_metadata()
        except Exception:  # noqa: BLE001
            pass
        raise Outcome("Succeeded", "Executed %d code cells" % self.cells_completed)

    async def wait_ready(self, kc):
        """kernel_info handshake (like jupyter_client's wait_for_ready, minus its 0.2 s IOPub flush)."""
        from queue import Empty

        deadline = time.monotonic() + STARTUP_TIMEOUT
        sent = set()  # a reply to any of our kernel_info requests will do
        while True:
            sent.add(kc.kernel_info())
            reply = None
            end = time.monotonic() + 0.5
            try:
                while reply is None:
                    msg = await kc.shell_channel.get_msg(timeout=max(0.0, end - time.monotonic()))
                    if (msg.get("parent_header") or {}).get("msg_id") in sent:
                        reply = msg
            except Empty:
                pass
            if reply is not None:
                # IOPub is connected once it carries a message about one of our requests (slow joiner)
                end = time.monotonic() + 0.25
                try:
                    while True:
                        msg = await kc.iopub_channel.get_msg(timeout=max(0.0, end - time.monotonic()))
                        if (msg.get("parent_header") or {}).get("msg_id") in sent:
                            break
                except Empty:
                    reply = None
            if reply is not None and reply.get("msg_type") == "kernel_info_reply":
                handle = getattr(kc, "_handle_kernel_info_reply", None)
                if handle is not None:
                    try:
                        handle(reply)
                    except Exception:  # noqa: BLE001
                        pass
                return reply
            if not self.kernel.alive():
                raise Outcome(
                    "KernelDied",
                    "The kernel %r exited (code %s) before it was ready"
                    % (self.kernel.spec.name, self.kernel.proc.returncode),
                )
            if time.monotonic() > deadline:
                raise Outcome("KernelDied", "The kernel did not become ready within %d s" % STARTUP_TIMEOUT)


def error_from_cell(cell, exc):
    """(ename, evalue, ANSI-free traceback) of a failed cell."""
    for out in reversed(cell.get("outputs") or []):
        if out.get("output_type") == "error":
            tb = out.get("traceback") or []
            return (
                out.get("ename"),
                strip_ansi(out.get("evalue")),
                strip_ansi("\n".join(tb) if isinstance(tb, list) else str(tb)),
            )
    return (
        getattr(exc, "ename", None) or type(exc).__name__,
        strip_ansi(getattr(exc, "evalue", None) or str(exc)),
        strip_ansi(getattr(exc, "traceback", None) or ""),
    )


def main():
    Run().main(sys.argv[1:])


if __name__ == "__main__":
    main()
