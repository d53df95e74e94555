"""download=true against a loopback HTTP server (no test reaches the internet): small archives
in the real formats (CIFAR-10's python version, an archive of WikiText-2's token files) with
their own checksums; a transfer that succeeds, one whose archive has the wrong checksum, one
cut short, and one archive whose member would land outside data_dir."""
import hashlib
import http.server
import io
import os
import re
import sys
import tarfile
import threading
import zipfile

import pytest

import train
from powergossip import data
from powergossip.data import cifar10, downloads
from powergossip.errors import ConfigError
from tests.test_data import fake_cifar, write_wikitext
from tests.test_runs import records
from tests.train_runs import run


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of the server's `files`, with Range requests answered 206 when the server honours
    them; the server's `cut` (a byte count), when set, ends the next answer's body there and
    closes the connection (a transfer broken midway)."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") and \
            server.honours_range else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if server.cut is not None:
            payload, server.cut, self.close_connection = payload[:server.cut], None, True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A server on 127.0.0.1 in a thread: `.files` {path: bytes}, `.url(path)`, `.requests`
    [(path, Range header)], `.honours_range`, `.cut`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.honours_range, httpd.cut = {}, [], True, None
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def tar_gz(folder, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """(bytes of a cifar-10-python.tar.gz holding a small cifar-10-batches-py/ in the real pickle
    layout, what its batches hold)."""
    folder = tmp_path_factory.mktemp("cifar_source") / "cifar-10-batches-py"
    written = fake_cifar(folder, per_batch=4, n_test=4)
    return tar_gz(folder, "cifar-10-batches-py"), written


@pytest.fixture(scope="module")
def wikitext_archive(tmp_path_factory):
    """Bytes of a zip of wikitext-2/wiki.{train,valid,test}.tokens, as the original archive held them."""
    folder = tmp_path_factory.mktemp("wikitext_source")
    write_wikitext(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for split in ("train", "valid", "test"):
            zipped.write(folder / f"wiki.{split}.tokens", f"wikitext-2/wiki.{split}.tokens")
    return buffer.getvalue()


def left_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_cifar10_is_fetched_checked_and_extracted_once_then_train_trains_on_it(tmp_path, server, cifar_archive, monkeypatch,
                                                                                capsys):
    archive, written = cifar_archive
    server.files["/cifar-10-python.tar.gz"] = archive
    monkeypatch.setattr(cifar10, "URL", server.url("/cifar-10-python.tar.gz"))  # CIFAR-10's own, here on the loopback
    monkeypatch.setattr(cifar10, "MD5", hashlib.new("md5", archive).hexdigest())
    data_dir = tmp_path / "data"
    settings = ["task=cifar10", "task_architecture=small_cnn", f"data_dir={data_dir}", "download=true", "n_workers=2",
                "batch_size=4", "num_epochs=1", "max_batches_per_epoch=1", "evaluate_each_worker=false", "device=cpu"]
    run(str(tmp_path / "run"), settings)
    assert [r for r in records(tmp_path / "run") if r[0] == "accuracy"]  # it trained and was evaluated on what was fetched
    assert "downloading http://127.0.0.1" in capsys.readouterr().out  # no terminal here: one line instead of the bar
    assert left_in(data_dir) == [".download.lock", "cifar-10-batches-py", "cifar-10-python.tar.gz"]
    train_x, train_y, test_x, test_y = cifar10.load_cifar10(str(data_dir))
    assert train_x.shape == (20, 3, 32, 32) and test_y.tolist() == written["test_batch"][b"labels"]

    # Two processes of a launch at once: one fetches, the other waits for it and finds the data.
    other = tmp_path / "other"
    mirror = server.url("/mirror/cifar.tar.gz")
    server.files["/mirror/cifar.tar.gz"] = archive
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    both = [threading.Thread(target=data.download, args=("cifar10", str(other), mirror, hashlib.sha256(archive).hexdigest()))
            for _ in range(2)]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join(timeout=60)
    assert [path for path, _ in server.requests] == ["/cifar-10-python.tar.gz", "/mirror/cifar.tar.gz"]
    assert "100%" in capsys.readouterr().err  # in a terminal, a progress bar on stderr
    assert left_in(other) == [".download.lock", "cifar-10-batches-py", "cifar.tar.gz"]
    data.load("cifar10", str(data_dir), download=True)  # there: nothing is fetched
    assert len(server.requests) == 2


def test_an_archive_with_the_wrong_checksum_is_refused_in_one_line_and_nothing_is_extracted(tmp_path, server, cifar_archive,
                                                                                           capsys):
    server.files["/cifar-10-python.tar.gz"] = cifar_archive[0]
    data_dir, out = tmp_path / "data", tmp_path / "run"
    with pytest.raises(SystemExit) as exit_status:
        train.command_line(["task=cifar10", f"data_dir={data_dir}", "download=true", f"download_url={server.url('/cifar-10-python.tar.gz')}",
                            f"download_sha256={'f' * 64}", f"output_dir={out}"])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"train.py: configuration error \(process 0\): task=cifar10, data_dir=\S+: the archive downloaded from http://\S+ has "
        r"sha256 [0-9a-f]{64}, not f{64} \(download_sha256\); it was deleted and nothing was extracted", lines[0])
    assert left_in(data_dir) == [".download.lock"] and not out.exists()


@pytest.mark.parametrize("task,honours_range", [("cifar10", True), ("wikitext2", False)])
def test_an_interrupted_transfer_is_never_used_and_the_next_attempt_completes_it(tmp_path, server, cifar_archive,
                                                                                  wikitext_archive, task, honours_range):
    """Cut midway: the part is kept aside and nothing is extracted; the next attempt continues it
    with a Range request (or, from a server that ignores ranges, fetches it again)."""
    archive = cifar_archive[0] if task == "cifar10" else wikitext_archive
    name = "cifar-10-python.tar.gz" if task == "cifar10" else "wikitext-2-v1.zip"
    server.files[f"/{name}"], server.honours_range, server.cut = archive, honours_range, len(archive) // 3
    url, sha256 = server.url(f"/{name}"), hashlib.sha256(archive).hexdigest()
    with pytest.raises(downloads.Interrupted, match=f"stopped after {len(archive) // 3} of {len(archive)} bytes; run again"):
        data.download(task, str(tmp_path), url, sha256)
    assert left_in(tmp_path) == [".download.lock", f"{name}.part"]
    assert (tmp_path / f"{name}.part").read_bytes() == archive[:len(archive) // 3]
    data.download(task, str(tmp_path), url, sha256)
    assert server.requests[1] == (f"/{name}", f"bytes={len(archive) // 3}-")
    assert (tmp_path / name).read_bytes() == archive
    assert data.load(task, str(tmp_path)).train_x.numel() > 0


def test_an_archive_member_outside_data_dir_is_refused(tmp_path, server):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"bad"))
    server.files["/evil.tar.gz"] = buffer.getvalue()
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="evil.tar.gz is refused: .*outside"):
        data.download("cifar10", str(data_dir), server.url("/evil.tar.gz"), hashlib.sha256(buffer.getvalue()).hexdigest())
    assert left_in(tmp_path) == ["data"] and left_in(data_dir) == [".download.lock", "evil.tar.gz"]


def test_download_settings_that_cannot_work_are_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found: .*Pass download=true to fetch"):
        data.load("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"WikiText-2 not found: .*download=true download_url=<its URL> "
                                                r"download_sha256=<its SHA-256>"):
        data.load("wikitext2", str(tmp_path))
    for settings, message in [
        (dict(task="wikitext2", task_architecture="lstm", download=True), "download=true for task=wikitext2 needs download_url"),
        (dict(task="cifar10", download=True, download_url="ftp://host/a.tgz"), "download_url must be an http:// or https://"),
        (dict(task="cifar10", download=True, download_sha256="abc"), "download_sha256 must be a SHA-256 digest"),
        (dict(task="cifar10", download_url="http://host/a.tgz"), "read with download=true only"),
        (dict(download=True), "task=fashion_mnist has nothing to download"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train.validated(dict(train._DEFAULTS, data_dir=str(tmp_path / "not_yet"), **settings))
    assert not (tmp_path / "not_yet").exists()
    assert train.validated(dict(train._DEFAULTS, task="cifar10", data_dir=str(tmp_path / "not_yet"), download=True))


def test_an_archive_already_in_data_dir_is_checked_and_used_or_left_alone(tmp_path, server, cifar_archive, monkeypatch):
    """An archive the user put there (or a download that was not extracted): no request is made."""
    archive = cifar_archive[0]
    monkeypatch.setattr(cifar10, "URL", server.url("/cifar-10-python.tar.gz"))  # nothing served there
    monkeypatch.setattr(cifar10, "MD5", hashlib.new("md5", archive).hexdigest())
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive[:-1] + b"!")
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz is already there but is not the archive expected: its md5 "
                                         r"is [0-9a-f]{32}, CIFAR-10's MD5 is [0-9a-f]{32}; move it aside"):
        data.download("cifar10", str(tmp_path))
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == archive[:-1] + b"!"  # left as it was
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive)
    data.download("cifar10", str(tmp_path))
    assert server.requests == [] and cifar10.find_folder(str(tmp_path)) is not None
