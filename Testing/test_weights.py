"""Model registry, cache, download (from a local HTTP server) and import of weight files; ``mais weights``."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from MAISSegmentLib import weights
from MAISSegmentLib.checkpoint import build_model, save_checkpoint
from MAISSegmentLib.errors import CheckpointError, MAISError
from MAISSegmentLib.weights import WeightsError
from test_cli import mais

REF_TINY = TINY / "ref_tiny.pth"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    """A small real MAISSegment checkpoint (the tiny preset, random weights)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ours.pth"
    save_checkpoint(build_model("sam-med3d-tiny"), path, "tiny-test", "0.0.1")
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.body  # type: ignore[attr-defined]
        if self.path == "/tiny.pth":
            self._send(200, body, len(body))
        elif self.path == "/short.pth":  # announces the whole file, sends half, closes
            self._send(200, body[: len(body) // 2], len(body))
        elif self.path == "/nolength.pth":  # no Content-Length: the end is the closed connection
            self._send(200, body[: len(body) // 2], None)
        elif self.path == "/page.pth":
            self._send(200, b"<html>Please log in</html>", 26)
        elif self.path == "/padded.pth":  # the file and 2 MiB more, no Content-Length
            self._send(200, body + bytes(2 << 20), None)
        elif self.path == "/other.pth":  # another valid checkpoint of the same layout
            self._send(200, self.server.other_body, len(self.server.other_body))  # type: ignore[attr-defined]
        elif self.path in ("/redirect-http.pth", "/redirect-https.pth"):  # to /tiny.pth on this server
            scheme = self.path[len("/redirect-") : -len(".pth")]
            host, port = self.server.server_address[:2]
            self.send_response(302)
            self.send_header("Location", f"{scheme}://{host}:{port}/tiny.pth")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True
        else:
            self._send(404, b"not found", 9)

    def _send(self, code: int, data: bytes, length: int | None) -> None:
        self.send_response(code)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def server(ours):
    """HTTP server on 127.0.0.1 (own thread) serving the tiny checkpoint; stopped after the module."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, client_address: None  # clients that hang up early are part of the tests
    httpd.body = ours.read_bytes()  # type: ignore[attr-defined]
    other = ours.parent / "tiny_other.pth"
    save_checkpoint(build_model("sam-med3d-tiny"), other, "tiny-test", "0.0.2")
    httpd.other_body = other.read_bytes()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.body  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def entry(mid: str, **kw) -> dict:
    base = {
        "id": mid,
        "version": "0.0.1",
        "file": f"{mid.replace('-', '_')}.pth",
        "url": None,
        "sha256": None,
        "size_bytes": None,
        "license": "test",
        "format": "maissegment",
        "preset": "sam-med3d-tiny",
        "description": "test model",
        "trained_on": "nothing",
    }
    return {**base, **kw}


def write_registry(folder: Path, models: list[dict], default: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.json"
    path.write_text(json.dumps({"version": 1, "default": default, "models": models}))
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------- registry
def test_builtin_registry_lists_turbo_and_the_bundled_default(tmp_path):
    default, models = weights.load_registry(weights.DEFAULT_REGISTRY)
    builtin = next(m for m in models if m.id == default)  # checked in detail by test_builtin_model.py
    assert builtin.format == "maissegment" and builtin.file.startswith("models/") and builtin.url is None
    turbo = next(m for m in models if m.id == "sam-med3d-turbo")
    assert turbo.url == "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
    assert (turbo.file, turbo.format, turbo.preset) == ("sam_med3d_turbo.pth", "sam-med3d", "sam-med3d-vit-b")
    assert turbo.sha256 is None and turbo.size_bytes is None and turbo.license.startswith("Apache-2.0")
    assert turbo.trained_on == "SA-Med3D-140K (SAM-Med3D authors)" and turbo.description
    assert weights._preset_backbone_keys("sam-med3d-vit-b") == 324  # the turbo checkpoint's tensor count
    listed = weights.list_models(weights.DEFAULT_REGISTRY, tmp_path)
    assert next(m for m in listed if m.id == "sam-med3d-turbo").status == "not downloaded"
    with pytest.raises(WeightsError, match="mais weights download sam-med3d-turbo") as err:
        weights.resolve("sam-med3d-turbo", weights.DEFAULT_REGISTRY, tmp_path)
    assert "mais weights import FILE --id sam-med3d-turbo" in str(err.value)
    assert isinstance(err.value, MAISError) and isinstance(err.value, ValueError)
    with pytest.raises(WeightsError, match="unknown model 'nope'"):
        weights.resolve("nope", weights.DEFAULT_REGISTRY, tmp_path)


def test_locations_follow_environment(tmp_path, monkeypatch):
    reg = write_registry(tmp_path / "r", [entry("a")], default="a")
    monkeypatch.setenv("MAIS_MODELS_JSON", str(reg))
    monkeypatch.setenv("MAIS_WEIGHTS_DIR", str(tmp_path / "cache"))
    assert weights.registry_path() == reg and weights.cache_dir() == tmp_path / "cache"
    assert weights.default_model_id() == "a"
    monkeypatch.delenv("MAIS_WEIGHTS_DIR")
    assert weights.cache_dir() == Path.home() / ".cache" / "maissegment" / "weights"


@pytest.mark.parametrize(
    ("models", "default", "message"),
    [
        ([entry("a", format="onnx")], None, "'format' must be one of"),
        ([entry("a"), entry("a")], None, "appears twice"),
        ([entry("a")], "b", "default 'b' is not one of"),
        ([entry("a", sha256="abc")], None, "64 hex digits"),
        ([entry("a", file="../x.pth")], None, "without '..'"),
        ([entry("a", url="ftp://x/y")], None, "http(s) URL"),
        ([{**entry("a"), "colour": "red"}], None, "unknown field"),
    ],
)
def test_bad_registry_is_a_clear_error(tmp_path, models, default, message):
    reg = write_registry(tmp_path, models, default)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        weights.list_models(reg, tmp_path / "cache")
    reg.write_text("{not json")
    with pytest.raises(WeightsError, match="cannot be read"):
        weights.load_registry(reg)


# ------------------------------------------------------------------------------------- download
def test_download_with_progress_then_verified_copy_is_reused(server, tmp_path):
    url, body = server
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/tiny.pth", sha256=sha(body), size_bytes=len(body))])
    cache = tmp_path / "cache"
    calls: list[tuple[int, int | None]] = []
    path = weights.download("tiny", progress=lambda d, t: calls.append((d, t)), registry=reg, cache=cache)
    assert path == cache / "tiny.pth" and path.read_bytes() == body
    assert calls[0] == (0, len(body)) and calls[-1] == (len(body), len(body)) and len(calls) >= 3
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert files_in(cache) == ["tiny.pth", "user_models.json"]  # no temporary file left
    assert weights.resolve("tiny", reg, cache) == path
    listed = weights.get_model("tiny", reg, cache)
    assert listed.status == "cached" and listed.local_sha256 == sha(body) and listed.source == f"{url}/tiny.pth"
    calls.clear()
    assert weights.download("tiny", progress=lambda d, t: calls.append((d, t)), registry=reg, cache=cache) == path
    assert calls == []  # verified copy already there: nothing downloaded


def test_download_sha_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/tiny.pth", sha256="0" * 64)])
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="not the registered file"):
        weights.download("tiny", registry=reg, cache=cache)
    assert files_in(cache) == []
    with pytest.raises(WeightsError, match="is not downloaded"):
        weights.resolve("tiny", reg, cache)


@pytest.mark.parametrize(
    ("path", "size", "message"),
    [
        ("short.pth", None, "cut short"),  # fewer bytes than Content-Length
        ("nolength.pth", "full", "bytes instead of"),  # no Content-Length; registry size says it is short
        ("nolength.pth", None, "not a usable checkpoint"),  # no size, no SHA: it must at least load
        ("page.pth", None, "not a usable checkpoint"),  # e.g. a login page
        ("missing.pth", None, "HTTP 404"),
    ],
)
def test_bad_downloads_are_errors_and_leave_nothing(server, tmp_path, path, size, message):
    url, body = server
    size_bytes = len(body) if size == "full" else None
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/{path}", size_bytes=size_bytes)])
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=message):
        weights.download("tiny", registry=reg, cache=cache, timeout=10)
    assert files_in(cache) == []


def test_download_without_known_sha_checks_the_layout_and_records_it(server, tmp_path):
    url, body = server
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/tiny.pth")])
    cache = tmp_path / "cache"
    path = weights.download("tiny", registry=reg, cache=cache)
    assert weights.get_model("tiny", reg, cache).local_sha256 == sha(body)
    path.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(WeightsError, match="damaged or a different file"):
        weights.resolve("tiny", reg, cache)
    assert weights.download("tiny", registry=reg, cache=cache).read_bytes() == body  # damaged copy replaced
    # registered as another layout: the downloaded file cannot be it
    reg = write_registry(tmp_path / "r2", [entry("tiny", url=f"{url}/tiny.pth", preset="mais-small")])
    with pytest.raises(WeightsError, match="has the mais-small layout"):
        weights.download("tiny", registry=reg, cache=tmp_path / "cache2")
    assert files_in(tmp_path / "cache2") == []


def test_download_follows_redirects_only_to_https(server, tmp_path):
    url, body = server
    cache = tmp_path / "cache"
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/redirect-http.pth", sha256=sha(body))])
    with pytest.raises(WeightsError, match=r"redirects \(HTTP 302\) to http://.* not an https:// address"):
        weights.download("tiny", registry=reg, cache=cache, timeout=10)
    assert files_in(cache) == []
    # an https target is followed (this plain-http test server then fails the TLS handshake)
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/redirect-https.pth", sha256=sha(body))])
    with pytest.raises(WeightsError, match="cannot reach") as err:
        weights.download("tiny", registry=reg, cache=cache, timeout=10)
    assert "not an https:// address" not in str(err.value) and files_in(cache) == []


@pytest.mark.parametrize(
    ("path", "size", "max_bytes", "message"),
    [
        ("tiny.pth", None, 1000, "offers .* bytes, more than the limit of 1000 bytes"),  # Content-Length over the cap
        ("padded.pth", None, "body", "larger than the limit of .* bytes"),  # no Content-Length: stopped mid-stream
        ("padded.pth", "body", None, "larger than the registry's size"),  # the registry's size is the cap
    ],
)
def test_download_size_is_capped(server, tmp_path, path, size, max_bytes, message):
    url, body = server
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/{path}", size_bytes=len(body) if size else None)])
    cache = tmp_path / "cache"
    cap = {"max_bytes": len(body) + 1000 if max_bytes == "body" else max_bytes} if max_bytes else {}
    seen: list[int] = []
    with pytest.raises(WeightsError, match=message):
        weights.download("tiny", progress=lambda d, t: seen.append(d), registry=reg, cache=cache, timeout=10, **cap)
    assert files_in(cache) == [] and max(seen, default=0) < len(body) + (2 << 20)  # stopped before the end


def test_first_download_records_the_hash_and_later_ones_must_match(server, tmp_path, ours):
    url, body = server
    cache = tmp_path / "cache"
    turbo = weights.get_model("sam-med3d-turbo", weights.DEFAULT_REGISTRY, cache)
    assert turbo.verification_text == "unverified (first download records the hash)"
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/tiny.pth")])
    assert weights.get_model("tiny", reg, cache).verification_text == turbo.verification_text
    path = weights.download("tiny", registry=reg, cache=cache)
    e = weights.get_model("tiny", reg, cache)
    assert e.local_sha256 == sha(body)
    assert e.verification_text == "SHA-256 recorded at first download (trust on first use)"
    write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/other.pth")])  # the server now hands out another file
    with pytest.raises(WeightsError, match="differs from the file first downloaded") as err:
        weights.download("tiny", registry=reg, cache=cache, force=True)
    assert "mais weights import FILE --id tiny --replace" in str(err.value)
    assert path.read_bytes() == body and weights.get_model("tiny", reg, cache).local_sha256 == sha(body)
    assert files_in(cache) == ["tiny.pth", "user_models.json"]
    pinned = write_registry(tmp_path / "r2", [entry("tiny", url=f"{url}/tiny.pth", sha256=sha(body))])
    assert weights.get_model("tiny", pinned, cache).verification_text == "verified (SHA-256 in the registry)"
    mine = weights.import_weights(ours, id="mine", registry=reg, cache=cache)
    assert mine.verification_text == "SHA-256 recorded at import"


@pytest.mark.parametrize(
    ("field", "value"),
    [("license", 5), ("version", {"major": 1}), ("preset", ["mais-small"]), ("description", []), ("trained_on", 1.5)],
)
def test_wrongly_typed_registry_fields_are_clean_errors(tmp_path, field, value):
    reg = write_registry(tmp_path / "r", [entry("a", **{field: value})], default="a")
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=f"model 'a': '{field}' must be .* or null"):
        weights.list_models(reg, cache)
    with pytest.raises(WeightsError, match=f"'{field}' must be"):
        weights.resolve("a", reg, cache)
    write_registry(tmp_path / "r", [entry("a")], default=["a"])
    with pytest.raises(WeightsError, match="'default' must be a model id"):
        weights.list_models(reg, cache)


@pytest.mark.parametrize(
    ("model_id", "field", "value"),
    [("mine", "sha256", 12345), ("mine", "version", {"v": 1}), ("mine", "size_bytes", "big"), ("../evil", None, None)],
)
def test_wrongly_typed_user_registry_is_a_clean_error(ours, tmp_path, model_id, field, value):
    reg = write_registry(tmp_path / "r", [])
    cache = tmp_path / "cache"
    weights.import_weights(ours, id="mine", registry=reg, cache=cache)
    doc = json.loads((cache / "user_models.json").read_text())
    record = doc["models"].pop("mine")
    doc["models"][model_id] = {**record, **({field: value} if field else {})}
    (cache / "user_models.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match=r"user_models\.json is damaged"):
        weights.list_models(reg, cache)
    with pytest.raises(WeightsError, match="is damaged"):
        weights.resolve(model_id, reg, cache)


def test_cli_wrongly_typed_registries_give_one_line_errors(ours, tmp_path, monkeypatch):
    monkeypatch.setenv("MAIS_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MAIS_MODELS_JSON", str(write_registry(tmp_path / "r", [entry("a", license=5)])))
    proc = mais("weights", "list")
    assert proc.returncode == 2 and proc.stderr.startswith("mais: error:") and "'license' must be" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    reg = write_registry(tmp_path / "r", [])
    weights.import_weights(ours, id="mine", registry=reg, cache=tmp_path / "cache")
    doc = json.loads((tmp_path / "cache" / "user_models.json").read_text())
    doc["models"]["mine"]["sha256"] = 12345
    (tmp_path / "cache" / "user_models.json").write_text(json.dumps(doc))
    proc = mais("weights", "path", "mine")  # resolves the id as --model does
    assert proc.returncode == 2 and "user_models.json is damaged" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"http://127.0.0.1:{port}/tiny.pth")])
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=f"cannot reach 127.0.0.1:{port}") as err:
        weights.download("tiny", registry=reg, cache=cache, timeout=5)
    assert "mais weights import FILE --id tiny" in str(err.value)
    assert files_in(cache) == []
    reg = write_registry(tmp_path / "r2", [entry("local")])
    with pytest.raises(WeightsError, match="no download address"):
        weights.download("local", registry=reg, cache=cache)


# --------------------------------------------------------------------------------------- import
def test_import_ours_and_sam_med3d_state_dict(ours, tmp_path):
    reg = write_registry(tmp_path / "r", [])
    cache = tmp_path / "cache"
    e = weights.import_weights(ours, registry=reg, cache=cache)
    assert e.id == "tiny-test" and e.format == "maissegment" and e.preset == "sam-med3d-tiny"
    assert e.status == "imported" and e.path == cache / "imported" / "tiny-test.pth"
    assert e.local_sha256 == sha(ours.read_bytes()) and e.source == str(ours.resolve()) and e.imported_at
    assert weights.resolve("tiny-test", reg, cache) == e.path
    assert build_model(None, checkpoint=e.path).load_report.model_id == "tiny-test"
    r = weights.import_weights(REF_TINY, id="ref-tiny", registry=reg, cache=cache)
    assert (r.format, r.preset, r.version) == ("sam-med3d", "sam-med3d-tiny", None)
    assert weights.resolve("ref-tiny", reg, cache).read_bytes() == REF_TINY.read_bytes()
    assert [m.id for m in weights.list_models(reg, cache)] == ["ref-tiny", "tiny-test"]
    assert not [f for f in files_in(cache) if "/." in f or f.startswith(".")]


def test_import_refuses_non_checkpoints_and_bad_ids(tmp_path):
    reg = write_registry(tmp_path / "r", [])
    cache = tmp_path / "cache"
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        weights.import_weights(text, registry=reg, cache=cache)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.import_weights(tmp_path / "missing.pth", registry=reg, cache=cache)
    with pytest.raises(WeightsError, match="invalid model id"):
        weights.import_weights(REF_TINY, id="../evil", registry=reg, cache=cache)
    assert not cache.exists() or files_in(cache) == []


def test_import_id_collisions(ours, tmp_path):
    reg = write_registry(tmp_path / "r", [])
    cache = tmp_path / "cache"
    first = weights.import_weights(ours, id="x", registry=reg, cache=cache)
    again = weights.import_weights(ours, id="x", registry=reg, cache=cache)  # the same file: fine
    assert again.local_sha256 == first.local_sha256
    with pytest.raises(WeightsError, match="already taken by another file"):
        weights.import_weights(REF_TINY, id="x", registry=reg, cache=cache)
    assert weights.resolve("x", reg, cache).read_bytes() == ours.read_bytes()  # untouched
    replaced = weights.import_weights(REF_TINY, id="x", replace=True, registry=reg, cache=cache)
    assert replaced.format == "sam-med3d" and replaced.local_sha256 == sha(REF_TINY.read_bytes())
    assert weights.resolve("x", reg, cache).read_bytes() == REF_TINY.read_bytes()


def test_import_as_turbo_needs_the_vit_b_layout(ours, tmp_path):
    cache = tmp_path / "cache"
    reg = weights.DEFAULT_REGISTRY
    with pytest.raises(WeightsError, match=r"sam-med3d-vit-b layout \(324 tensors\)"):
        weights.import_weights(REF_TINY, id="sam-med3d-turbo", registry=reg, cache=cache)
    named = tmp_path / "sam_med3d_turbo.pth"  # the public file's name alone makes it the turbo model
    shutil.copyfile(REF_TINY, named)
    with pytest.raises(WeightsError, match="is not 'sam-med3d-turbo'"):
        weights.import_weights(named, registry=reg, cache=cache)
    with pytest.raises(WeightsError, match="it is a maissegment checkpoint"):
        weights.import_weights(ours, id="sam-med3d-turbo", registry=reg, cache=cache)
    assert not cache.exists() or files_in(cache) == []


def test_import_under_a_registered_id_reports_its_sha(tmp_path):
    reg = write_registry(tmp_path / "r", [entry("public-tiny", format="sam-med3d")])
    cache = tmp_path / "cache"
    e = weights.import_weights(REF_TINY, id="public-tiny", registry=reg, cache=cache)
    digest = sha(REF_TINY.read_bytes())
    assert e.builtin and e.status == "imported" and e.path == cache / "public_tiny.pth"
    assert any(digest in n and "models.json" in n for n in e.notes)
    assert weights.resolve("public-tiny", reg, cache) == e.path
    shutil.copyfile(REF_TINY, tmp_path / "r" / "public_tiny.pth")  # now bundled: no imported copy can shadow it
    with pytest.raises(WeightsError, match="is bundled"):
        weights.import_weights(REF_TINY, id="public-tiny", registry=reg, cache=cache)
    assert weights.get_model("public-tiny", reg, cache).status == "bundled"
    assert weights.resolve("public-tiny", reg, cache) == tmp_path / "r" / "public_tiny.pth"
    # once the registry records another hash, this file is refused
    reg = write_registry(tmp_path / "r2", [entry("public-tiny", format="sam-med3d", sha256="1" * 64)])
    with pytest.raises(WeightsError, match="differs from the registered"):
        weights.import_weights(REF_TINY, id="public-tiny", registry=reg, cache=tmp_path / "cache2")


def test_damaged_cached_file_is_detected(ours, tmp_path):
    reg = write_registry(tmp_path / "r", [])
    cache = tmp_path / "cache"
    e = weights.import_weights(ours, id="mine", registry=reg, cache=cache)
    data = bytearray(e.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    e.path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged or a different file") as err:
        weights.resolve("mine", reg, cache)
    assert "--replace" in str(err.value)
    assert weights.resolve("mine", reg, cache, verify=False) == e.path
    e.path.write_bytes(bytes(data[:100]))  # truncated: caught by the size alone
    assert weights.get_model("mine", reg, cache).status == "damaged"
    with pytest.raises(WeightsError, match="wrong size"):
        weights.resolve("mine", reg, cache)
    e.path.unlink()
    assert weights.get_model("mine", reg, cache).status == "missing"
    (cache / "user_models.json").write_text("[broken")
    with pytest.raises(WeightsError, match="is damaged"):
        weights.list_models(reg, cache)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_weights_list_import_path(server, tmp_path, monkeypatch):
    url, body = server
    monkeypatch.setenv("MAIS_WEIGHTS_DIR", str(tmp_path / "cache"))
    proc = mais("weights", "list")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("sam-med3d-turbo"))
    assert "sam-med3d" in row and "not downloaded" in row and "Apache-2.0" in row
    assert proc.stdout.splitlines()[0].split()[:4] == ["id", "version", "format", "status"]
    proc = mais("weights", "import", str(REF_TINY), "--id", "ref-tiny")
    assert proc.returncode == 0, proc.stderr
    path = (tmp_path / "cache" / "imported" / "ref-tiny.pth").resolve()
    assert proc.stdout.splitlines()[-1] == str(path) and sha(body) != sha(REF_TINY.read_bytes())
    proc = mais("weights", "path", "ref-tiny")
    assert proc.returncode == 0 and proc.stdout.strip() == str(path)
    proc = mais("weights", "import", str(REF_TINY), "--id", "sam-med3d-turbo")
    assert proc.returncode == 2 and proc.stderr.startswith("mais: error:") and "324" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = mais("weights", "path", "sam-med3d-turbo")
    assert proc.returncode == 2 and "mais weights download sam-med3d-turbo" in proc.stderr
    assert "Traceback" not in proc.stderr
    # download through a registry override, progress on stderr, path on stdout
    reg = write_registry(tmp_path / "r", [entry("tiny", url=f"{url}/tiny.pth", sha256=sha(body))])
    monkeypatch.setenv("MAIS_MODELS_JSON", str(reg))
    proc = mais("weights", "download", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "cache" / "tiny.pth") and "100%" in proc.stderr
    listing = mais("weights", "list").stdout
    assert "cached" in listing and "ref-tiny" in listing and "imported" in listing
    assert "verified (SHA-256 in the registry)" in listing
    unverified = write_registry(tmp_path / "u", [entry("later", url=f"{url}/tiny.pth")])  # no SHA-256 known
    monkeypatch.setenv("MAIS_MODELS_JSON", str(unverified))
    row = next(line for line in mais("weights", "list").stdout.splitlines() if line.startswith("later"))
    assert "unverified (first download records the hash)" in row


def test_cli_model_option_and_default(tmp_path, monkeypatch):
    from MAISSegmentLib.io import write_volume
    from MAISSegmentLib.volume import Volume

    image = tmp_path / "image.nii.gz"
    k, j, i = np.meshgrid(*[np.arange(n) for n in (24, 28, 30)], indexing="ij")
    blob = (np.abs(i - 12) + np.abs(j - 12) + np.abs(k - 12) < 8).astype(np.int16)
    write_volume(Volume(1000 * blob, np.eye(4)), image)
    monkeypatch.setenv("MAIS_WEIGHTS_DIR", str(tmp_path / "cache"))
    reg = write_registry(tmp_path / "r", [entry("bundled-tiny", format="sam-med3d")])
    monkeypatch.setenv("MAIS_MODELS_JSON", str(reg))
    args = ["segment", "--image", str(image), "--point", "12,12,12,+", "--device", "cpu"]
    proc = mais(*args, "--out", str(tmp_path / "a.nii.gz"))
    assert proc.returncode == 2 and "needs --checkpoint FILE or --model ID" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = mais(*args, "--model", "bundled-tiny", "--checkpoint", str(REF_TINY), "--out", str(tmp_path / "a.nii.gz"))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = mais(*args, "--model", "bundled-tiny", "--out", str(tmp_path / "a.nii.gz"))
    assert proc.returncode == 2 and "mais weights import FILE --id bundled-tiny" in proc.stderr
    # bundled beside the registry and made the default: used with neither option
    shutil.copyfile(REF_TINY, reg.parent / "bundled_tiny.pth")
    write_registry(tmp_path / "r", [entry("bundled-tiny", format="sam-med3d")], default="bundled-tiny")
    proc = mais(*args, "--out", str(tmp_path / "b.nii.gz"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b.nii.gz").exists()
    proc = mais("finetune", "--manifest", str(tmp_path / "none.json"), "--model", "nope", "--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def test_export_release_drops_training_state_halves_the_file_and_predicts_the_same(tmp_path):
    """`mais weights export`: a training checkpoint (weights + AdamW state) becomes a float16 release file that
    loads into the float32 network, keeps id/version/provenance (merged with --provenance), and whose file
    SHA-256 printed for the registry is what `resolve` then verifies."""
    import torch

    model = build_model("sam-med3d-tiny")
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # give AdamW real moments, as a training checkpoint has
        p.grad = torch.randn_like(p)
    opt.step()
    train_ckpt = tmp_path / "last.pth"
    save_checkpoint(
        model, train_ckpt, "tiny-test", "0.1.0", provenance={"steps": 5}, extra={"optimizer": opt.state_dict()}
    )
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"test_split": {"dice@10": 0.5}}))
    out = tmp_path / "release" / "tiny.pth"
    out.parent.mkdir()
    run = mais("weights", "export", str(train_ckpt), "--out", str(out), "--provenance", str(card))
    assert run.returncode == 0, run.stderr
    printed = run.stdout
    digest = sha(out.read_bytes())
    assert digest in printed and f"{out.stat().st_size:,} bytes" in printed
    assert out.stat().st_size < 0.4 * train_ckpt.stat().st_size  # no optimizer state, half-precision weights

    loaded = build_model(None, checkpoint=out)
    rep = loaded.load_report
    assert (rep.model_id, rep.version) == ("tiny-test", "0.1.0")
    assert rep.provenance == {"steps": 5, "test_split": {"dice@10": 0.5}}
    raw = torch.load(out, weights_only=True)
    assert raw["storage_dtype"] == "float16" and "optimizer" not in raw
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype  # the network stays float32
        torch.testing.assert_close(b, a.half().to(a.dtype), rtol=0, atol=0, msg=k)

    torch.manual_seed(0)
    n = model.cfg.image_encoder.img_size
    img = torch.randn(1, 1, n, n, n)
    with torch.no_grad():
        a = model.image_encoder(img)
        b = loaded.image_encoder(img)
    assert (a - b).abs().max() < 2e-2 * a.abs().max()  # fp16 rounding of the weights only

    reg = tmp_path / "release" / "models.json"
    reg.write_text(
        json.dumps(
            {
                "version": 1,
                "default": "tiny-test",
                "models": [entry("tiny-test", file="tiny.pth", sha256=digest, size_bytes=out.stat().st_size)],
            }
        )
    )
    assert weights.resolve("tiny-test", registry=reg, cache=tmp_path / "cache") == out
    out.write_bytes(out.read_bytes()[:-10] + b"0123456789")  # same size, different bytes
    with pytest.raises(WeightsError, match="damaged or a different file"):
        weights.resolve("tiny-test", registry=reg, cache=tmp_path / "cache")


def test_int8_release_is_half_the_float16_file_and_predicts_almost_the_same(tmp_path):
    """`mais weights export --dtype int8`: matrices as int8 rows with float32 scales (float16 for the rest), loaded
    back into the float32 network; the file is about half the float16 one, every weight within half a quantisation
    step, and the embedding within 1%. Damaged scales are refused."""
    import torch

    from MAISSegmentLib.checkpoint import export_release

    torch.manual_seed(0)
    model = build_model("mais-small")
    src = tmp_path / "model.pth"
    save_checkpoint(model, src, "small-test", "1")
    half = export_release(src, tmp_path / "half.pth", dtype="float16")
    eight = tmp_path / "int8.pth"
    run = mais("weights", "export", str(src), "--out", str(eight), "--dtype", "int8")
    assert run.returncode == 0, run.stderr
    assert eight.stat().st_size < 0.6 * half["size_bytes"]
    raw = torch.load(eight, weights_only=True)
    assert raw["storage_dtype"] == "int8" and raw["quant_scales"]
    assert all(raw["state_dict"][k].dtype == torch.int8 for k in raw["quant_scales"])
    loaded = build_model(None, checkpoint=eight)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        if key in raw["quant_scales"]:
            step = raw["quant_scales"][key].view(-1, *[1] * (value.ndim - 1))
            assert ((got - value).abs() <= step / 2 + 1e-6).all(), key
    n = model.cfg.image_encoder.img_size
    image = torch.randn(1, 1, n, n, n)
    with torch.no_grad():
        a, b = model.encode_image(image), loaded.encode_image(image)
    assert (a - b).norm() < 0.01 * a.norm()
    key = next(iter(raw["quant_scales"]))
    raw["quant_scales"][key] = raw["quant_scales"][key][:-1]  # one scale short
    torch.save(raw, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError, match="does not match its row scales"):
        build_model(None, checkpoint=tmp_path / "damaged.pth")


def test_export_release_refuses_bad_input(tmp_path, ours):
    with pytest.raises(MAISError, match="unknown dtype"):
        from MAISSegmentLib.checkpoint import export_release

        export_release(ours, tmp_path / "x.pth", dtype="int4")
    with pytest.raises(CheckpointError):
        export_release(tmp_path / "missing.pth", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    run = mais("weights", "export", str(ours), "--out", str(tmp_path / "y.pth"), "--provenance", str(ours))
    assert run.returncode == 2 and "cannot be read as JSON" in run.stderr
    assert not (tmp_path / "y.pth").exists()
