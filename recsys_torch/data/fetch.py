"""Downloads and the data cache: GroupLens zips (MD5-checked where GroupLens publishes a sum), the
copy of ml-100k inside the RecBole wheel on PyPI (``pip download``, SHA-256-checked, never installed),
and :func:`fetch_into_cache`, which stages a download, validates it and publishes it into the cache
atomically. The cache is ``root``, else ``$RECSYS_TORCH_DATA``, else ``~/.cache/recsys_torch``.
:mod:`recsys_torch.data.movielens` says which files make up each variant and reads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from recsys_torch.data.raw import RawDataset
from recsys_torch.errors import DataError

logger = logging.getLogger(__name__)


def one_line(exc: BaseException | str) -> str:
    """An exception (or text) as one line for a message."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Sources and checksums (module-level so tests and users can point them elsewhere)
# ---------------------------------------------------------------------------------------------------

#: Base URL of the GroupLens zips; ``{base}/{zip_name}.zip``.
GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
#: Socket timeout (seconds) for the GroupLens download (per connect/read, not for the whole file).
DOWNLOAD_TIMEOUT = 5.0
#: MD5 sums published by GroupLens, by variant. Variants without one are downloaded unverified.
GROUPLENS_MD5 = {"ml-100k": "0e33842e24a9c977be4e0107933c0723"}
#: Download chunk size in bytes.
CHUNK_SIZE = 1 << 16

#: The RecBole release whose wheel carries a copy of ml-100k (fallback source; never installed).
RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k"
RECBOLE_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
#: How a cached ml-100k ratings file is known to be (a copy of) the real one: how the real file starts.
#: A truncated copy starts the same way, so a file that starts like this must be the whole real file.
ML100K_RATINGS_START = {
    "u.data": b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n",
    "ml-100k.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
}
#: Rows of GroupLens' ml-100k files (GroupLens publishes an MD5 of the zip only, not of its files).
ML100K_ROWS = {"u.data": 100_000, "u.item": 1682, "u.user": 943}
#: Timeout (seconds) for ``pip download`` of the RecBole wheel.
PIP_TIMEOUT = 120.0

#: Environment variable naming the data cache folder.
DATA_ENV = "RECSYS_TORCH_DATA"
#: Staging folders older than this (seconds) are left-overs of killed fetches and are removed.
STALE_STAGING_AGE = 24 * 3600

# ---------------------------------------------------------------------------------------------------
# The cache and the downloads
# ---------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RECSYS_TORCH_DATA`` or ``~/.cache/recsys_torch``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/recsys_torch").expanduser()


def grouplens_url(zip_name: str) -> str:
    return f"{GROUPLENS_BASE_URL.rstrip('/')}/{zip_name}.zip"


def _download(url: str, dest: Path, *, timeout: float, md5: str | None, desc: str) -> None:
    """Stream ``url`` into ``dest`` with a progress bar, checking ``md5`` when given."""
    hasher = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        total = int(length) if length and str(length).isdigit() else None
        with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=desc, leave=False) as bar:
            while True:
                chunk = response.read(CHUNK_SIZE)
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                bar.update(len(chunk))
    if md5 is not None and hasher.hexdigest() != md5.lower():
        raise DataError(f"{url}: MD5 mismatch (expected {md5}, got {hasher.hexdigest()}); the download is corrupt")


def _extract(archive: Path, dest: Path, wanted: tuple[str, ...], required: tuple[str, ...]) -> None:
    """Copy the members of a zip whose base name is in ``wanted`` flat into ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            found = {}
            for info in zf.infolist():
                base = info.filename.rstrip("/").rsplit("/", 1)[-1]
                if info.is_dir() or "__MACOSX" in info.filename or base not in wanted:
                    continue
                found.setdefault(base, info)
            missing = [f for f in required if f not in found]
            if missing:
                raise DataError(f"{archive.name}: zip has no {', '.join(missing)}")
            for base, info in found.items():
                with zf.open(info) as src, open(dest / base, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_SIZE)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise DataError(f"{archive.name}: cannot unzip: {one_line(exc)}") from None


def fetch_grouplens(source, dest: str | os.PathLike) -> None:
    """Download a GroupLens zip (``GROUPLENS_BASE_URL``) into ``dest`` and unpack the files of
    ``source`` (a :class:`recsys_torch.data.movielens.Variant`: ``name``, ``zip_name``, ``files``)."""
    dest = Path(dest)
    url = grouplens_url(source.zip_name)
    md5 = GROUPLENS_MD5.get(source.name)
    if md5 is None:
        logger.warning("%s: GroupLens publishes no checksum known here; the download is not verified", source.name)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive = Path(tmp) / f"{source.zip_name}.zip"
        logger.info("%s: downloading %s", source.name, url)
        _download(url, archive, timeout=DOWNLOAD_TIMEOUT, md5=md5, desc=f"{source.zip_name}.zip")
        required = source.files if source.name == "ml-100k" else source.files[:1]
        _extract(archive, dest, source.files, required)


def _pip_download_recbole(dest: Path) -> Path:
    """``pip download`` the RecBole wheel (no dependencies, wheels only) into ``dest``; its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"recbole=={RECBOLE_VERSION}", "-d", str(dest), "-q",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download recbole=={RECBOLE_VERSION} timed out after {PIP_TIMEOUT:g} s") from None
    except OSError as exc:
        raise DataError(f"cannot run pip download: {one_line(exc)}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln] or lines
        detail = one_line(errors[-1]) if errors else f"exit status {proc.returncode}"
        raise DataError(f"pip download recbole=={RECBOLE_VERSION} failed: {detail}")
    wheels = sorted(Path(dest).glob("recbole-*.whl"))
    if not wheels:
        raise DataError(f"pip download recbole=={RECBOLE_VERSION} left no wheel in {dest}")
    return wheels[0]


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def extract_recbole_ml100k(wheel: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Check the RecBole wheel and its three ml-100k files against the SHA-256 sums; write them to ``dest``."""
    wheel, dest = Path(wheel), Path(dest)
    digest = _sha256_file(wheel)
    if digest != RECBOLE_WHEEL_SHA256:
        raise DataError(f"{wheel.name}: SHA-256 mismatch (expected {RECBOLE_WHEEL_SHA256}, got {digest})")
    try:
        with zipfile.ZipFile(wheel) as zf:
            contents = {}
            for name, expected in RECBOLE_ML100K_SHA256.items():
                member = f"{RECBOLE_MEMBER_DIR}/{name}"
                try:
                    data = zf.read(member)
                except KeyError:
                    raise DataError(f"{wheel.name}: has no {member}") from None
                got = hashlib.sha256(data).hexdigest()
                if got != expected:
                    raise DataError(f"{wheel.name}: {member}: SHA-256 mismatch (expected {expected}, got {got})")
                contents[name] = data
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise DataError(f"{wheel.name}: cannot unzip: {one_line(exc)}") from None
    for name, data in contents.items():
        (dest / name).write_bytes(data)


def _starts_like(path: Path, start: bytes) -> bool:
    """Whether the file begins with ``start`` (or, shorter than it, is a beginning of it)."""
    with open(path, "rb") as fh:
        head = fh.read(len(start))
    return bool(head) and start.startswith(head)


def check_cached_ml100k(folder: str | os.PathLike) -> None:
    """Raise a DataError when ``folder`` (the ml-100k folder of the cache) holds a damaged copy of the
    real ml-100k: a ratings file that starts like the real one must be all of it (RecBole's files:
    their SHA-256 sums; GroupLens' files: their row counts), and its side files must be there and
    whole. Files that do not start like the real ones (a data set put there by hand) are not checked."""
    folder = Path(folder)

    def damaged(name: str, detail: str) -> DataError:
        return DataError(f"{folder / name}: the cached copy of ml-100k is damaged ({detail}); "
                         f"delete the folder {folder} to download it again")

    try:
        if (folder / "u.data").is_file():
            if not _starts_like(folder / "u.data", ML100K_RATINGS_START["u.data"]):
                return
            for name, expected in ML100K_ROWS.items():
                if not (folder / name).is_file():
                    raise damaged(name, "missing")
                rows = sum(1 for line in (folder / name).read_bytes().split(b"\n") if line.strip())
                if rows != expected:
                    raise damaged(name, f"{rows:,} rows, the real file has {expected:,}")
        elif (folder / "ml-100k.inter").is_file():
            if not _starts_like(folder / "ml-100k.inter", ML100K_RATINGS_START["ml-100k.inter"]):
                return
            for name, expected in RECBOLE_ML100K_SHA256.items():
                if not (folder / name).is_file():
                    raise damaged(name, "missing")
                if _sha256_file(folder / name) != expected:
                    size = (folder / name).stat().st_size
                    raise damaged(name, f"SHA-256 mismatch, {size:,} bytes: truncated or changed")
    except OSError as exc:
        raise DataError(f"{folder}: cannot read the cached ml-100k files: {exc.strerror or one_line(exc)}") from None


def fetch_recbole_ml100k(dest: str | os.PathLike) -> None:
    """Get ml-100k from the RecBole wheel on PyPI (downloaded, verified, never installed) into ``dest``."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        logger.info("ml-100k: downloading the recbole==%s wheel with pip", RECBOLE_VERSION)
        wheel = _pip_download_recbole(Path(tmp))
        extract_recbole_ml100k(wheel, dest)


def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def fetch_ml100k(source, staging: Path) -> str:
    """Fill ``staging`` with ml-100k: GroupLens first, RecBole's copy second. Returns the source."""
    try:
        fetch_grouplens(source, staging)
        return f"GroupLens ({grouplens_url(source.zip_name)})"
    except Exception as exc:  # noqa: BLE001 -- any failure (no network, bad zip, checksum) falls back
        first = one_line(exc)
        logger.warning("ml-100k: GroupLens download failed (%s); trying the RecBole %s wheel", first, RECBOLE_VERSION)
        _clear(staging)
    try:
        fetch_recbole_ml100k(staging)
        return f"RecBole {RECBOLE_VERSION} wheel (PyPI)"
    except Exception as exc:  # noqa: BLE001
        second = one_line(exc)
    raise DataError(f"cannot download ml-100k (GroupLens: {first}; RecBole wheel: {second})")


def _remove_stale_staging(cache: Path, name: str) -> None:
    now = time.time()
    for old in cache.glob(f".{name}-partial-*"):
        try:
            if now - old.stat().st_mtime > STALE_STAGING_AGE:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _publish(staging: Path, final: Path, marker: str) -> None:
    """Move a complete ``staging`` folder to ``final`` atomically.

    A fresh ``final`` is one rename. If ``final`` already exists (e.g. an empty folder or stray
    side files), files are moved in one by one with the ratings file (the "ready" marker) last.
    """
    try:
        os.rename(staging, final)
        return
    except OSError:
        if not final.is_dir():
            raise
    names = sorted((p.name for p in staging.iterdir() if p.is_file()), key=lambda n: n == marker)
    for name in names:
        os.replace(staging / name, final / name)
    shutil.rmtree(staging, ignore_errors=True)


def fetch_into_cache(name: str, cache: Path, fill: Callable[[Path], str], read: Callable[[Path], RawDataset | None],
                     marker: Callable[[Path], str], hint: str) -> RawDataset:
    """Download a data set into ``cache/name`` atomically: ``fill(staging)`` downloads into a fresh
    staging folder (returning a description of the source), ``read(staging)`` validates the files
    before they enter the cache, and the folder is published with the file ``marker(staging)`` (the
    "ready" mark) last. ``hint`` tells the user how to put the files there by hand."""
    final = cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(cache, name)
        staging = cache / f".{name}-partial-{secrets.token_hex(6)}"
        staging.mkdir()  # not mkdtemp: the published folder should get the usual (umask) permissions
    except OSError as exc:
        raise DataError(f"{cache}: cannot create the data cache folder: {exc.strerror or one_line(exc)}") from None
    try:
        try:
            source = fill(staging)
        except DataError as exc:
            raise DataError(f"{exc}; {hint}") from None
        except Exception as exc:  # noqa: BLE001 -- network errors of every kind
            raise DataError(f"cannot download {name} ({one_line(exc)}); {hint}") from None
        try:
            dataset = read(staging)
        except DataError as exc:
            raise DataError(f"{name}: the downloaded files are unreadable ({exc}); {hint}") from None
        if dataset is None:
            raise DataError(f"{name}: the download holds no ratings file; {hint}")
        try:
            _publish(staging, final, marker(staging))
        except OSError as exc:
            raise DataError(f"{final}: cannot move the downloaded files into place: "
                            f"{exc.strerror or one_line(exc)}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: downloaded from %s into %s", name, source, final)
    return dataset
