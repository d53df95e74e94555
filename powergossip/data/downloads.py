"""Fetching a data set's archive over HTTP(S) into its data_dir, checked and extracted
without leaving anything half done (urllib, hashlib, tarfile, zipfile; no torchvision).

    fetch_and_extract(url, data_dir, ("md5", "c58f..."), holds_data, checksum_name="CIFAR-10's MD5")

- One process at a time per data_dir: a lock file (`data_dir/.download.lock`, flock). The
  processes of a launch that share data_dir take turns: the first fetches and extracts, the
  others wait for it and then find the data there (`holds_data`), without a download of
  their own and without talking to each other (a download may outlast any collective's
  timeout).
- The archive goes to `<name>.part` and is renamed to `<name>` only once it is whole and
  its checksum is right: an interrupted transfer is never used. A new attempt continues a
  `.part` with an HTTP Range request (a server that ignores it sends the whole file,
  which replaces the part); a whole file with the wrong checksum is deleted, so the next
  attempt starts afresh. An archive already there under `<name>` (a download that was not
  extracted, or one the user put there) is checked and used; one with the wrong checksum is
  refused and left alone.
- Extraction goes to a temporary folder inside data_dir; only when it holds the data
  (`holds_data`) are its top-level entries renamed into data_dir (nothing there is
  replaced), and the temporary folder is removed whatever happens. Tar members that would
  land outside it are refused by tarfile's "data" filter, zip members by their resolved path.
- A progress bar (tqdm, on stderr) in a terminal; otherwise one line saying what is fetched.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

CHUNK = 1 << 20
TIMEOUT_S = 60.0  # a server silent this long counts as gone (the transfer stops; a new attempt continues it)


class Interrupted(OSError):
    """A transfer that ended before the server's announced length (the part is kept)."""


def archive_name(url: str) -> str:
    """The file name an archive from `url` gets in data_dir: the last part of the URL's path."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return name if name not in ("", ".", "..") else "archive"


def fetch_and_extract(url: str, data_dir: str, checksum: tuple[str, str], holds_data, checksum_name: str) -> None:
    """Make data_dir hold the data set from the archive at `url` (see the module's notes).
    `checksum`: (hashlib algorithm, expected hex digest); `holds_data(folder)`: whether a
    folder holds the data set (after extraction, the temporary folder; before, data_dir);
    `checksum_name` names the checksum in messages (the key that gave it). ValueError for an
    archive that is not the expected one (or does not hold the data set), OSError for a
    transfer that failed (Interrupted: it can be continued)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".download.lock"), "a") as lock:
        import fcntl  # here: the module imports where there is no fcntl; downloads need it

        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also when the process dies)
        if holds_data(data_dir):
            return  # another process of the launch fetched it meanwhile
        archive = os.path.join(data_dir, archive_name(url))
        if os.path.exists(archive):
            found = digest(archive, checksum[0])
            if found != checksum[1]:
                raise ValueError(f"{archive} is already there but is not the archive expected: its {checksum[0]} is "
                                 f"{found}, {checksum_name} is {checksum[1]}; move it aside (or delete it) and run again")
        else:
            _fetch(url, archive, checksum, checksum_name)
        extract(archive, data_dir, holds_data)


def digest(path: str, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _fetch(url: str, archive: str, checksum: tuple[str, str], checksum_name: str) -> None:
    """Download `url` to `archive` through `archive.part`, continued where a part exists."""
    part = archive + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as problem:
        if problem.code != 416 or not have:  # 416: nothing after `have` bytes: the part may be whole already
            raise OSError(f"cannot download {url}: HTTP {problem.code} {problem.reason}") from None
        response = None
    except urllib.error.URLError as problem:
        raise OSError(f"cannot download {url}: {problem.reason}") from None
    if response is not None:
        with response:
            continues = response.status == 206 and _range_start(response) == have
            if not continues:
                have = 0  # the server sends the whole file: it replaces the part
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            _receive(response, part, "ab" if continues else "wb", have, total, url)
    found = digest(part, checksum[0])
    if found != checksum[1]:
        os.remove(part)  # whole but wrong (or damaged on the way): the next attempt starts afresh
        raise ValueError(f"the archive downloaded from {url} has {checksum[0]} {found}, not {checksum[1]} "
                         f"({checksum_name}); it was deleted and nothing was extracted")
    os.replace(part, archive)


def _range_start(response) -> int | None:
    """Where a 206 answer's Content-Range starts ("bytes START-END/TOTAL")."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0]) if value.startswith("bytes ") else None
    except (IndexError, ValueError):
        return None


def _receive(response, part: str, mode: str, have: int, total: int | None, url: str) -> None:
    """Append the response's body to `part` (flushed to disk as it comes), with a progress
    bar in a terminal; Interrupted if it ends before `total` bytes."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(part[:-len(".part")]))
    else:
        size = f" ({total / 1e6:.1f} MB)" if total is not None else ""
        print(f"downloading {url}{size} to {part[:-len('.part')]}", flush=True)
    received = have
    try:
        with open(part, mode) as f:
            with contextlib.suppress(OSError, http.client.HTTPException):  # a broken connection: judged by the length
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    finally:
        if bar is not None:
            bar.close()
    if total is not None and received < total:
        raise Interrupted(f"the download of {url} stopped after {received} of {total} bytes; run again to continue it "
                          f"(the part is kept as {part})")


def extract(archive: str, data_dir: str, holds_data) -> None:
    """Extract `archive` (tar, compressed or not, or zip) into a temporary folder inside
    data_dir and, once it holds the data set, rename its top-level entries into data_dir."""
    staging = tempfile.mkdtemp(prefix=".extracting-", dir=data_dir)
    try:
        if tarfile.is_tarfile(archive):
            if not hasattr(tarfile, "data_filter"):
                raise OSError("extracting a tar archive safely needs tarfile's data filter (Python 3.11.4 or newer)")
            with tarfile.open(archive) as tar:
                try:
                    tar.extractall(staging, filter="data")
                except tarfile.FilterError as problem:
                    raise ValueError(f"{archive} is refused: {problem}") from None
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                root = os.path.realpath(staging)
                for member in zipped.namelist():
                    if os.path.commonpath([root, os.path.realpath(os.path.join(root, member))]) != root:
                        raise ValueError(f"{archive} is refused: its member {member!r} would be extracted outside {data_dir}")
                zipped.extractall(staging)
        else:
            raise ValueError(f"{archive} is neither a tar nor a zip archive")
        if not holds_data(staging):
            raise ValueError(f"{archive} does not hold the data set's files (extracted: "
                             f"{', '.join(sorted(os.listdir(staging))) or 'nothing'}); nothing was put in {data_dir}")
        entries = sorted(os.listdir(staging))
        taken = [entry for entry in entries if os.path.lexists(os.path.join(data_dir, entry))]
        if taken:
            raise ValueError(f"{os.path.join(data_dir, taken[0])} is there already but does not hold the whole data set; "
                             f"move it aside and run again (the archive is kept in {data_dir})")
        for entry in entries:
            os.rename(os.path.join(staging, entry), os.path.join(data_dir, entry))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
