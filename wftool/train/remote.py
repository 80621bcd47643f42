"""Model directories on remote storage (gs://, s3://, hf://, ...) through fsspec.

A stage can start from a remote `init`, and `sync_to` copies every stage's `final/` there
once it is written, so runs on preemptible cloud machines keep their results.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from wftool.errors import WftError


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise WftError(
            f"cannot open {url}: {err}",
            "gs:// needs gcsfs, s3:// needs s3fs, hf:// needs huggingface_hub",
        ) from None


def stage_url(sync_to: str, run_name: str, stage: str) -> str:
    return f"{sync_to.rstrip('/')}/{run_name}/{stage}/final"


def upload_dir(local: Path, url: str) -> str:
    """Copy the directory `local` to `url` (replacing files of the same name)."""
    fs, root = _filesystem(url)
    try:
        fs.makedirs(root, exist_ok=True)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(local).as_posix()}")
    except OSError as err:
        raise WftError(f"cannot upload {local} to {url}: {err}") from None
    return url


def fetch_dir(url: str, cache: Path) -> Path:
    """Download the directory at `url` into `cache` (fresh each time) and return it."""
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/config.json"):
        raise WftError(f"{url} is not a model directory (no config.json)")
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for remote in fs.find(root):
            target = partial / remote.lstrip("/")[len(root.lstrip("/")) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    except OSError as err:
        raise WftError(f"cannot download {url}: {err}") from None
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)
    return cache
