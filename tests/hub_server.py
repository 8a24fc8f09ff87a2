"""A small Hub-compatible HTTP server for tests, plus the pytest fixtures that point huggingface_hub at it.

It implements the subset of the Hugging Face Hub API that ``huggingface_hub`` 2.x uses to create repos, upload
(regular files inline in the commit, large/binary files through the LFS batch API with the "basic" transfer),
read model info, list trees/refs/commits, create branches and tags, and download files by revision
(``/resolve/`` with ``ETag``, ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size`` and byte ranges).

Storage is content-addressed in a temp dir; every commit is an immutable snapshot ``{path: FileEntry}`` so
old revisions stay downloadable (revision pinning). Private repos answer 401 ``RepoNotFound`` to requests
without a valid token, like the real Hub.

Endpoint patching (the fixture ``hub``): ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE`` ... once, at import time, and by the time a test runs it has long been imported (PEFT imports
it). The fixture therefore sets the environment variables (for subprocesses, which import afresh) *and*
monkeypatches the already-computed values in ``huggingface_hub.constants`` (``ENDPOINT``,
``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH`` ..., ``HF_HUB_OFFLINE``,
``HF_HUB_DISABLE_XET``), the endpoint of the module-level ``huggingface_hub.hf_api.api`` instance (fixed when it
was created) and drops transformers' cached ``HfApi`` so it is rebuilt with the new endpoint. Xet is disabled
because this server does not implement a Xet CAS; uploads then take the LFS path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "fake-user"
TOKEN = "hf_fakeWriteTokenForTests000000000000"
READ_TOKEN = "hf_fakeReadTokenForTests0000000000000"
_TOKENS = {TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".model")
_LFS_THRESHOLD = 10 * 1024 * 1024
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    blob: str  # sha256 of the content (storage key)
    size: int
    git_oid: str  # git blob sha1 (regular files) or sha1 of the LFS pointer
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    description: str
    date: float
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: int = 0


class HubState:
    """Repos, commits and content-addressed blobs (thread-safe through one lock)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for assertions
        self._counter = 0
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()
            self.requests.clear()

    # blobs --------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.root, "blobs", sha256)

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return digest

    def has_blob(self, sha256: str) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{64}", sha256)) and os.path.exists(self.blob_path(sha256))

    # commits ------------------------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: Optional[str], title: str, description: str, files: dict) -> Commit:
        self._counter += 1
        body = json.dumps(
            [parent, title, description, self._counter, sorted((p, e.blob) for p, e in files.items())]
        ).encode()
        commit = Commit(hashlib.sha1(body).hexdigest(), parent, title, description, time.time(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private, time.time())
        blob = self.put_blob(_GITATTRIBUTES)
        entry = FileEntry(blob, len(_GITATTRIBUTES), git_sha1(_GITATTRIBUTES), False)
        first = self.new_commit(repo, None, "initial commit", "", {".gitattributes": entry})
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    @staticmethod
    def resolve(repo: Repo, revision: str) -> Optional[Commit]:
        revision = unquote(revision)
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in table:
                return repo.commits[table[revision[len(prefix) :]]]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and f"refs/pr/{m.group(1)}" in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.tags:
            return repo.commits[repo.tags[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        matches = [c for oid, c in repo.commits.items() if len(revision) >= 7 and oid.startswith(revision)]
        return matches[0] if len(matches) == 1 else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # plumbing -----------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = io.BytesIO()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out.write(self.rfile.read(size))
                self.rfile.readline()
            return out.getvalue()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as e:
            raise HubError(400, f"invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: Optional[dict] = None) -> None:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        self._send(status, json.dumps(obj).encode(), h)

    def _user(self) -> Optional[tuple[str, str]]:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:] if auth.startswith("Bearer ") else auth
        if token not in _TOKENS:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _TOKENS[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if user is None or user[1] != "write" or repo_id.split("/")[0] != user[0]:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = HubState.resolve(repo, revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    # dispatch -----------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.state.requests.append((method, path))
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("DELETE", r"/api/repos/delete", self._delete_repo),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._create_commit),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self._create_branch),
            ("DELETE", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self._delete_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/tag/(?P<rev>.+)", self._create_tag),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", self._refs),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/commits/(?P<rev>.+)", self._commits),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self._model_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self._model_info),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/lfs-verify/(?P<repo>[^/]+/[^/]+)", self._lfs_verify),
            ("GET", r"/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", r"/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/api/models/(?P<repo>[^/]+)", self._model_info),
        ]
        try:
            for m, pattern, fn in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    with self.state.lock:
                        fn(query=query, **match.groupdict())
                    return
            raise HubError(404, f"no route for {method} {path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if method == "HEAD":
                self._send(e.status, b"", headers, head=True)
            else:
                self._send_json({"error": e.message}, e.status, headers)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # repos --------------------------------------------------------------------------------------------------
    def _create_repo(self, query: dict) -> None:
        payload = self._json_body()
        user = self._user()
        if user is None or user[1] != "write":
            raise HubError(401, "You must be authenticated with a write token to create a repo")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "this test server only hosts model repos")
        name, org = payload.get("name"), payload.get("organization") or user[0]
        if not name or not re.fullmatch(r"[\w.-]+", name) or org != user[0]:
            raise HubError(400, f"invalid repo name {org}/{name}")
        repo_id = f"{org}/{name}"
        if repo_id in self.state.repos:
            self._send_json({"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"}, 409)
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.state.create_repo(repo_id, private)
        self._send_json({"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, query: dict) -> None:
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or USER}/{payload.get('name')}"
        self._repo(repo_id, write=True)
        del self.state.repos[repo_id]
        self._send_json({})

    def _whoami(self, query: dict) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            {
                "type": "user",
                "name": user[0],
                "orgs": [],
                "auth": {"accessToken": {"role": user[1], "displayName": "t"}},
            }
        )

    def _validate_yaml(self, query: dict) -> None:
        import yaml

        content = self._json_body().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        errors = []
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    # uploads ------------------------------------------------------------------------------------------------
    def _preupload(self, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        commit = HubState.resolve(r, rev)
        files = []
        for f in self._json_body().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(_LFS_SUFFIXES) or f["size"] > _LFS_THRESHOLD or b"\0" in sample
            existing = commit.files.get(f["path"]) if commit else None
            oid = None
            if existing is not None and existing.lfs == lfs:
                oid = existing.blob if lfs else existing.git_oid
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send_json({"files": files, "commitOid": commit.oid if commit else None})

    def _lfs_batch(self, query: dict, repo: str) -> None:
        self._repo(repo, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "only LFS uploads are supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.has_blob(oid):
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{repo}/{oid}"},
                    "verify": {"href": f"{self.base}/lfs-verify/{repo}"},
                }
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, query: dict, repo: str, oid: str) -> None:
        self._repo(repo)
        data = self._body()
        digest = self.state.put_blob(data)
        if digest != oid:
            os.remove(self.state.blob_path(digest))
            raise HubError(400, f"uploaded content has sha256 {digest}, expected {oid}")
        self._send(200)

    def _lfs_verify(self, query: dict, repo: str) -> None:
        self._repo(repo)
        payload = self._json_body()
        if not self.state.has_blob(payload.get("oid", "")):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._send_json({})

    def _create_commit(self, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        rev = unquote(rev)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        if "1" in query.get("create_pr", []):
            r.prs += 1
            parent = r.commits[r.branches["main"]]
            branch = f"refs/pr/{r.prs}"
        else:
            branch = rev.removeprefix("refs/heads/")
            if branch not in r.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            parent = r.commits[r.branches[branch]]
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                files[value["path"]] = FileEntry(self.state.put_blob(data), len(data), git_sha1(data), False)
            elif key == "lfsFile":
                if not self.state.has_blob(value["oid"]):
                    raise HubError(400, f"LFS file {value['path']} ({value['oid']}) was not uploaded")
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                )
                files[value["path"]] = FileEntry(value["oid"], value["size"], git_sha1(pointer.encode()), True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            elif key != "header":
                raise HubError(400, f"unsupported commit operation {key!r}")
        commit = self.state.new_commit(r, parent.oid, header.get("summary", ""), header.get("description", ""), files)
        r.branches[branch] = commit.oid
        pr_url = f"{self.base}/{repo}/discussions/{r.prs}" if branch.startswith("refs/pr/") else None
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.base}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
            }
        )

    # refs ---------------------------------------------------------------------------------------------------
    def _create_branch(self, query: dict, repo: str, branch: str) -> None:
        r = self._repo(repo, write=True)
        branch = unquote(branch)
        payload = self._json_body()
        if branch in r.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._commit(r, payload.get("startingPoint") or "main")
        r.branches[branch] = start.oid
        self._send_json({})

    def _delete_branch(self, query: dict, repo: str, branch: str) -> None:
        r = self._repo(repo, write=True)
        if r.branches.pop(unquote(branch), None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        self._send_json({})

    def _create_tag(self, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        tag = self._json_body().get("tag")
        if not tag:
            raise HubError(400, "missing tag name")
        if tag in r.tags:
            raise HubError(409, f"Tag {tag} already exists")
        r.tags[tag] = self._commit(r, rev).oid
        self._send_json({})

    def _refs(self, query: dict, repo: str) -> None:
        r = self._repo(repo)
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in r.branches.items() if "/" not in n
        ]
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in r.tags.items()]
        prs = [{"name": n, "ref": n, "targetCommit": c} for n, c in r.branches.items() if n.startswith("refs/pr/")]
        self._send_json({"branches": branches, "tags": tags, "converts": [], "pullRequests": prs})

    def _commits(self, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo)
        commit, out = self._commit(r, rev), []
        while commit is not None:
            out.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.description,
                    "authors": [{"user": USER}],
                    "date": _iso(commit.date),
                }
            )
            commit = r.commits.get(commit.parent) if commit.parent else None
        self._send_json(out)

    # reads --------------------------------------------------------------------------------------------------
    def _model_info(self, query: dict, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        siblings = []
        for p, e in sorted(commit.files.items()):
            s: dict = {"rfilename": p}
            if "true" in [v.lower() for v in query.get("blobs", [])]:
                s.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.blob, "pointerSize": 134}
            siblings.append(s)
        card = None
        if "README.md" in commit.files:
            card = _card_data(open(self.state.blob_path(commit.files["README.md"].blob), "rb").read())
        self._send_json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(r.created),
                "private": r.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card or {}).get("tags") or []),
                "library_name": (card or {}).get("library_name"),
                "cardData": card,
                "siblings": siblings,
            }
        )

    def _tree(self, query: dict, repo: str, rev: str, sub: Optional[str] = None) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        prefix = (sub or "").strip("/")
        recursive = "true" in [v.lower() for v in query.get("recursive", [])]
        entries: dict[str, dict] = {}
        for p, e in sorted(commit.files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            parts = rest.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:i])
                if recursive or i == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_sha1(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                item: dict = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {"oid": e.blob, "size": e.size, "pointerSize": 134}
                entries[p] = item
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        self._send_json(list(entries.values()))

    def _resolve(self, query: dict, repo: str, rev: str, file: str) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        file = unquote(file)
        entry = commit.files.get(file)
        if entry is None:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        etag = f'"{entry.blob if entry.lfs else entry.git_oid}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)})
        with open(self.state.blob_path(entry.blob), "rb") as f:
            data = f.read()
        status = 200
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Type"] = "application/octet-stream"
        self._send(status, data, headers, head=self.command == "HEAD")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def _card_data(readme: bytes) -> Optional[dict]:
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.decode("utf-8", "replace"), re.S)
    if not m:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class HubServer:
    """A running test Hub on ``127.0.0.1`` (random port) with storage in a temp dir."""

    def __init__(self, root: Optional[str] = None) -> None:
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="fake-hub-")
        self.state = HubState(self.root)
        self._httpd = _HubHTTPServer(self.state)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class HubHandle:
    """What the ``hub`` fixture yields: the server, its URL, a write token and the env it set."""

    server: HubServer
    url: str
    token: str
    hf_home: str
    env: dict[str, str]

    @property
    def state(self) -> HubState:
        return self.server.state

    def api(self, token: Optional[str] = None) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=token or self.token)

    def set_offline(self, monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
        """Switch huggingface_hub's offline mode as ``HF_HUB_OFFLINE`` would have at import time."""
        import huggingface_hub.constants as c

        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", offline)
        self.env["HF_HUB_OFFLINE"] = "1" if offline else "0"


def point_hf_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: str, token: str) -> dict[str, str]:
    """Make ``huggingface_hub`` (already imported) and transformers talk to ``url`` and cache under ``hf_home``."""
    import huggingface_hub.constants as c
    import huggingface_hub.hf_api as hf_api_module

    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_TOKEN": token,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_ENABLE_HF_TRANSFER", raising=False)
    values = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in values.items():
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)
    monkeypatch.setattr(hf_api_module.api, "endpoint", url)
    with contextlib.suppress(ImportError):
        import transformers.utils.hub as th

        monkeypatch.setattr(th, "_hf_api", None, raising=False)
    return env


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubHandle]:
    """A clean test Hub with huggingface_hub pointed at it, a fake write token and ``HF_HOME`` in ``tmp_path``."""
    hub_server.state.reset()
    hf_home = str(tmp_path / "hf_home")
    os.makedirs(hf_home, exist_ok=True)
    env = point_hf_hub_at(monkeypatch, hub_server.url, hf_home, TOKEN)
    yield HubHandle(hub_server, hub_server.url, TOKEN, hf_home, env)
