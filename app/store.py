"""Where the gateway keeps image bytes: stored outputs and uploaded inputs.

``Store`` is the whole interface (put/get/delete/exists by key); ``DirectoryStore`` keeps
files under ``GATEWAY_DATA_DIR``. An object store (S3, GCS) can replace it by implementing
the same four methods; keys are plain relative paths like ``outputs/tsk_…/0``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


class Store(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key is not an error."""

    async def exists(self, key: str) -> bool: ...


class DirectoryStore:
    """Files under ``root``; writes are atomic (temporary file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid store key {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, self.path(key), data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    async def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        path = self.path(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        # Leave no empty per-task directory behind (best effort; another writer may race).
        try:
            if path.parent != self.root and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError:
            pass

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)
