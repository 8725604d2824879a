"""A loopback stand-in for the Hugging Face Hub HTTP API, for upload tests without network.

No Hub-API-compatible server installs from PyPI here (hf-local-hub ships only a Python client; its Go server is not
in the wheel), so this stub implements the endpoints huggingface_hub's `create_repo`, `create_branch`,
`list_repo_files` and `create_commit` call on the LFS upload path (set HF_HUB_DISABLE_XET=1: the Xet path talks to a
separate content-addressed storage service). It keeps repos in memory, checks the bearer token, checks LFS objects
against their sha256 and size, and records every request, so tests can assert what crossed the HTTP boundary.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model")
LFS_MIN_BYTES = 10 * 1024 * 1024  # the Hub stores files of 10 MB and more in LFS whatever their name
FRONT_MATTER = re.compile(r"^\s*---\r?\n([\S\s]*?)\r?\n---[ \t]*(\r?\n|$)")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStub:
    """Start with `with HubStub() as hub:`; `hub.endpoint` is the URL to put in HF_ENDPOINT."""

    def __init__(self, token: str = "hf_stub_write_token"):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "refs": {ref: {path: bytes}}, "commits": []}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                stub._handle(self, "GET")

            def do_POST(self):
                stub._handle(self, "POST")

            def do_PUT(self):
                stub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests ------------------------------------------------------------------------------------------

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id]["refs"][ref])

    def calls(self, method: str, pattern: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and re.search(pattern, r["path"])]

    # -- HTTP -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _body(handler: BaseHTTPRequestHandler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    handler.rfile.readline()
                    return b"".join(chunks)
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload=None, error_code: str | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if error_code:
            handler.send_header("X-Error-Code", error_code)
            handler.send_header("X-Error-Message", str((payload or {}).get("error", error_code)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body(handler) if method in ("POST", "PUT") else b""
        record = {"method": method, "path": path, "query": query, "auth": handler.headers.get("Authorization"),
                  "body_bytes": len(body)}
        with self.lock:
            self.requests.append(record)
            try:
                status, payload, code = self._route(method, path, query, body, handler.headers)
            except Exception as err:  # a stub bug must show up as a failing request, not a hung client
                status, payload, code = 500, {"error": f"stub error: {err!r}"}, None
        self._send(handler, status, payload, code)

    def _route(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, dict | list, str | None]:
        if method == "PUT" and path.startswith("/_lfs/"):  # presigned-URL upload: no Hub token, like S3
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}, None
            self.lfs[oid] = body
            return 200, {}, None
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, None
        if method == "POST" and path == "/api/repos/create":
            spec = json.loads(body)
            repo_id = f"{spec['organization']}/{spec['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}, None
            self.repos[repo_id] = {"private": spec.get("visibility") == "private" or spec.get("private") is True,
                                   "refs": {"main": {}}, "commits": []}
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}, None
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch|tree|revision)/(.+)", path)
        if match:
            repo_id, action, ref = match.groups()
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, "RepoNotFound"
            return getattr(self, f"_{action}")(self.repos[repo_id], repo_id, ref, query, body)
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}, None
        return 404, {"error": f"stub has no route for {method} {path}"}, None

    def _validate_yaml(self, content: str):
        from huggingface_hub import ModelCardData

        match = FRONT_MATTER.search(content)
        if not match:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, None
        try:
            meta = yaml.safe_load(match.group(1))
            if not isinstance(meta, dict):
                raise ValueError("metadata must be a mapping")
            ModelCardData(**meta)  # model-index must parse, as on the Hub
        except Exception as err:
            return 400, {"errors": [{"message": str(err)}]}, None
        return 200, {"errors": [], "warnings": []}, None

    def _preupload(self, repo, repo_id, ref, query, body):
        existing = repo["refs"].get(ref, {})
        files = []
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_BYTES
            old = existing.get(entry["path"])
            # like the Hub: the oid of an LFS file is its sha256, of a regular file its git blob sha1
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return 200, {"files": files, "commitOid": "0" * 40}, None

    def _branch(self, repo, repo_id, ref, query, body):
        if ref in repo["refs"]:
            return 409, {"error": "Reference already exists"}, None
        repo["refs"][ref] = dict(repo["refs"]["main"])
        return 200, {}, None

    def _revision(self, repo, repo_id, ref, query, body):  # repo_info, used after a commit with no changes
        commits = [c for c in repo["commits"] if c["ref"] == ref and not c["pr"]]
        return 200, {"id": repo_id, "sha": commits[-1]["oid"] if commits else "0" * 40,
                     "private": repo["private"]}, None

    def _tree(self, repo, repo_id, ref, query, body):
        if ref not in repo["refs"]:
            return 404, {"error": "Invalid rev id"}, "RevisionNotFound"
        return 200, [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                     for p, d in sorted(repo["refs"][ref].items())], None

    def _commit(self, repo, repo_id, ref, query, body):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        create_pr = query.get("create_pr") == ["1"]
        if ref not in repo["refs"]:
            return 404, {"error": "Invalid rev id"}, "RevisionNotFound"
        files = dict(repo["refs"][ref])
        ops = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}, None
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                if value["path"] not in files:
                    return 404, {"error": "A file with this name doesn't exist"}, "EntryNotFound"
                del files[value["path"]]
            else:
                return 400, {"error": f"unknown commit operation {key}"}, None
            ops.append((key, value["path"]))
        oid = hashlib.sha1(f"{repo_id}:{len(repo['commits'])}".encode()).hexdigest()
        pr_url = None
        if create_pr:
            number = sum(1 for r in repo["refs"] if r.startswith("refs/pr/")) + 1
            repo["refs"][f"refs/pr/{number}"] = files
            pr_url = f"{self.endpoint}/{repo_id}/discussions/{number}"
        else:
            repo["refs"][ref] = files
        repo["commits"].append({"oid": oid, "ref": ref, "summary": header["summary"], "ops": ops, "pr": create_pr})
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": pr_url}, None
