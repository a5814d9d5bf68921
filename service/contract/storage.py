"""Where checkpoint folders are kept: a local path (the data dir, or shared storage mounted at
the same path everywhere), or an fsspec URL such as `s3://bucket/prefix`, `gs://…` or
`file:///mnt/ckpts` (settings.checkpoint_url).

The worker writes a checkpoint locally and uploads it; the API and a resuming worker download
it before reading it. A LoRA checkpoint's merged whole model, made by a worker when someone
downloads it merged, is kept beside it (`merged_path`) and removed with it. Credentials and
endpoints come from the filesystem's own environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for S3 and S3-compatible stores).
"""

import contextlib
import shutil
from enum import StrEnum
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


class CheckpointKind(StrEnum):
    FULL = "full"  # a whole model (save_pretrained), loadable on its own
    LORA_ADAPTER = "lora_adapter"  # a PEFT adapter over its run's model.path


# Written after every other file of an upload: a folder without it is an upload that died
# half-way (or is being replaced) and does not count as a checkpoint.
COMPLETE = ".gvpo-complete"


def is_remote(path_or_url: str | Path) -> bool:
    return "://" in str(path_or_url)


def _fs(url: str):
    # A fresh instance per call: fsspec's instance cache would keep a client built from an
    # older environment (endpoint, credentials), and checkpoints are written rarely.
    fs, root = url_to_fs(url, skip_instance_cache=True)
    return fs, root.rstrip("/")


def exists(path_or_url: str | Path) -> bool:
    if not is_remote(path_or_url):
        return Path(path_or_url).is_dir()
    fs, root = _fs(str(path_or_url))
    return fs.exists(f"{root}/{COMPLETE}")


def remove(path_or_url: str | Path) -> None:
    """Delete a checkpoint folder; one that is already gone is no error."""
    if not is_remote(path_or_url):
        shutil.rmtree(path_or_url, ignore_errors=True)
        return
    fs, root = _fs(str(path_or_url))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)


def merged_path(path_or_url: str | Path) -> str:
    """Where the merged whole model of the LoRA checkpoint at `path_or_url` is kept."""
    return f"{str(path_or_url).rstrip('/')}-merged"


def discard(path_or_url: str | Path) -> None:
    """Delete a checkpoint and what was made from it (its merged copy)."""
    remove(path_or_url)
    remove(merged_path(path_or_url))


def upload(local_dir: Path, url: str) -> None:
    """Copy the folder `local_dir` to `url`, replacing what was there (a replayed step)."""
    fs, root = _fs(url)
    remove(url)
    files = sorted(f for f in Path(local_dir).rglob("*") if f.is_file())
    if isinstance(fs, LocalFileSystem):  # object stores have no folders (and s3fs's makedirs
        for folder in {f.parent for f in files}:  # would create a missing bucket, not fail)
            fs.makedirs(f"{root}/{folder.relative_to(local_dir).as_posix()}", exist_ok=True)
    for f in files:
        fs.put_file(str(f), f"{root}/{f.relative_to(local_dir).as_posix()}")
    with fs.open(f"{root}/{COMPLETE}", "wb"):
        pass


def download(url: str, local_dir: Path) -> Path:
    """Copy the checkpoint at `url` into `local_dir` (replaced if there); returns local_dir."""
    fs, root = _fs(url)
    local_dir = Path(local_dir)
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    for name in fs.find(root):
        rel = name[len(root) :].lstrip("/")
        if rel == COMPLETE:
            continue
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(target))
    return local_dir


def fetch(path_or_url: str | Path, scratch: Path) -> Path:
    """A local folder holding the checkpoint: a local path as it is, a URL downloaded into
    `scratch` (which the caller removes)."""
    if is_remote(path_or_url):
        return download(str(path_or_url), scratch)
    return Path(path_or_url)
