"""A small Kubernetes API client for the benchmarks: the standard library only.

Reads the dev cluster's admin kubeconfig (server, inline CA, bearer token), keeps one
keep-alive HTTPS connection per thread, and follows watches in threads of their own.
"""
import base64
import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse

GROUP = "/apis/notebooks.dev/v1alpha1"


def runs_path(ns):
    return f"{GROUP}/namespaces/{ns}/notebookruns"


PATHS = {
    "notebookruns": runs_path,
    "jobs": lambda ns: f"/apis/batch/v1/namespaces/{ns}/jobs",
    "leases": lambda ns: f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    "configmaps": lambda ns: f"/api/v1/namespaces/{ns}/configmaps",
    "events": lambda ns: f"/api/v1/namespaces/{ns}/events",
    "pods": lambda ns: f"/api/v1/namespaces/{ns}/pods",
}


class ApiError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


class Kube:
    def __init__(self, kubeconfig):
        with open(kubeconfig) as f:
            text = f.read()
        self.server = re.search(r"server:\s*(\S+)", text).group(1)
        ca = base64.b64decode(re.search(r"certificate-authority-data:\s*(\S+)", text).group(1)).decode()
        self.token = re.search(r"token:\s*(\S+)", text).group(1)
        self.ssl = ssl.create_default_context(cadata=ca)
        url = urllib.parse.urlparse(self.server)
        self.host, self.port = url.hostname, url.port or 443
        self.local = threading.local()

    def _connect(self, timeout=60):
        return http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=timeout)

    def request(self, method, path, body=None, ctype="application/json", raw=False):
        """One request on this thread's keep-alive connection (reconnects once if it was closed)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = ctype
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = self._connect()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
        if resp.status >= 300:
            raise ApiError(resp.status, payload.decode(errors="replace"))
        return payload if raw else json.loads(payload or b"null")

    def get(self, path):
        return self.request("GET", path)

    def get_opt(self, path):
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path, obj):
        return self.request("POST", path, obj)

    def merge_patch(self, path, patch):
        return self.request("PATCH", path, patch, ctype="application/merge-patch+json")

    def list_rv(self, path):
        """The list's resourceVersion (a point to start a watch from)."""
        return self.get(path + "?limit=1")["metadata"]["resourceVersion"]

    def metrics(self):
        return self.request("GET", "/metrics", raw=True).decode()

    def watch(self, path, on_event, rv=None):
        """Follows `path` from `rv` (or from now) in a thread; `on_event(t, type, obj)` for every
        event, t = time.monotonic() when it arrived. Returns a Watch (call .stop())."""
        w = Watch(self, path, on_event, rv)
        w.start()
        return w


class Watch(threading.Thread):
    def __init__(self, kube, path, on_event, rv):
        super().__init__(daemon=True)
        self.kube, self.path, self.on_event = kube, path, on_event
        self.rv = rv or kube.list_rv(path)
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self.conn = None

    def run(self):
        while not self.stopped.is_set():
            try:
                self.conn = self.kube._connect(timeout=None)
                query = urllib.parse.urlencode(
                    {"watch": "1", "resourceVersion": self.rv, "allowWatchBookmarks": "true",
                     "timeoutSeconds": "3600"})
                self.conn.request("GET", f"{self.path}?{query}",
                                  headers={"Authorization": f"Bearer {self.kube.token}"})
                resp = self.conn.getresponse()
                if resp.status != 200:
                    raise ApiError(resp.status, resp.read().decode(errors="replace"))
                self.ready.set()
                while not self.stopped.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    t = time.monotonic()
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if ev.get("type") == "ERROR":
                        # Too old a resourceVersion: start again from now (events in between are lost).
                        self.rv = self.kube.list_rv(self.path)
                        break
                    if rv:
                        self.rv = rv
                    if ev.get("type") != "BOOKMARK":
                        self.on_event(t, ev["type"], obj)
            except Exception:  # noqa: BLE001 - stop() closes the socket under the reader
                if self.stopped.is_set():
                    return
                time.sleep(0.2)

    def stop(self):
        self.stopped.set()
        if self.conn is not None:
            try:
                self.conn.sock.shutdown(2)
            except (OSError, AttributeError):
                pass
            self.conn.close()


def request_counts(metrics_text, group=None):
    """apiserver_request_total summed by (resource, subresource, verb) from the API server's /metrics."""
    counts = {}
    for line in metrics_text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if group is not None and labels.get("group") != group:
            continue
        key = (labels.get("resource", ""), labels.get("subresource", ""), labels.get("verb", ""))
        counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts
