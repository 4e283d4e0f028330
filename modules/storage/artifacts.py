"""Where artifact bytes live: S3 in production, a local directory for the embedded default."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from modules.errors import BadInputError, NotFoundError
from modules.storage.aws import error_code
from modules.storage.keys import MAX_KEY_LENGTH, validate_key

# A temp file name carries '~', which no valid key segment can, so list() never returns one.
_TMP_MARK = "~tmp-"


@runtime_checkable
class ArtifactStore(Protocol):
    """Bytes under validated `users/{user_id}/...` keys."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` at `key` atomically: readers see the old object or the new, never half."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Return the bytes at `key`; NotFoundError naming the key when absent."""
        ...

    def exists(self, key: str) -> bool:
        """Return True if an object is stored at `key`."""
        ...

    def size(self, key: str) -> int:
        """Return the stored size in bytes; NotFoundError when absent."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Return the sorted keys that start with `prefix`."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is absent."""
        ...

    def url(self, key: str, *, expires_s: int = 3600) -> str:
        """Return a URL to fetch `key`: presigned (S3) or a file:// URI (local)."""
        ...


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it starts with `users/{user_id}/` and is otherwise key-safe."""
    if not isinstance(prefix, str):
        raise BadInputError(f"invalid storage prefix {prefix!r}: must be a string")
    # A trailing '/' is a complete directory; append a placeholder segment to check the rest.
    probe = prefix + "x" if prefix.endswith("/") else prefix
    if len(probe) > MAX_KEY_LENGTH:
        raise BadInputError(f"invalid storage prefix {prefix!r}: too long")
    validate_key(probe)
    return prefix


def _check_data(key: str, data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInputError(f"data for {key!r} must be bytes, not {type(data).__name__}")
    return bytes(data)


class LocalStore:
    """Artifacts as files under `root/{key}`; the embedded default."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._resolved_root = self.root.resolve()

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = (self._resolved_root / key).resolve()
        # validate_key already forbids '..'; this also catches symlinks that point out of root.
        if not path.is_relative_to(self._resolved_root):
            raise BadInputError(f"invalid storage key {key!r}: resolves outside the store root")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write to a temp file in the target directory, fsync, then os.replace into place."""
        payload = _check_data(key, data)
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise BadInputError(f"cannot store {key!r}: a parent path is an object") from exc
        if path.is_dir():
            raise BadInputError(f"cannot store {key!r}: it is a prefix of other objects")
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + _TMP_MARK)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        self._fsync_dir(path.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # Makes the rename itself durable; some filesystems refuse O_RDONLY on dirs, so best effort.
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def get_bytes(self, key: str) -> bytes:
        """Return the file's bytes; NotFoundError naming the key when absent."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFoundError(f"artifact {key!r} not found") from exc

    def exists(self, key: str) -> bool:
        """Return True if a file is stored at `key`."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Return the file size in bytes; NotFoundError when absent."""
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"artifact {key!r} not found")
        return path.stat().st_size

    def list(self, prefix: str) -> list[str]:
        """Return the sorted keys under `prefix` (a partial last segment matches too)."""
        validate_prefix(prefix)
        start = self._resolved_root / prefix
        directory = start if prefix.endswith("/") else start.parent
        if not directory.is_dir():
            return []
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(directory):
            for name in filenames:
                if _TMP_MARK in name:
                    continue
                key = (Path(dirpath) / name).relative_to(self._resolved_root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file at `key`; no error if absent."""
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()

    def url(self, key: str, *, expires_s: int = 3600) -> str:
        """Return a file:// URI for `key` (expires_s does not apply); NotFoundError if absent."""
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"artifact {key!r} not found")
        return path.as_uri()


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Store:
    """Artifacts as S3 objects in one bucket; boto3 honours AWS_ENDPOINT_URL for moto/MinIO."""

    def __init__(
        self,
        bucket: str,
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        if not bucket:
            raise BadInputError("S3Store needs a bucket name")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._client = client

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            import boto3  # deferred: importing boto3 costs ~0.3 s and local mode never needs it

            self._client = boto3.client(
                "s3", region_name=self.region, endpoint_url=self.endpoint_url
            )
        return self._client

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (dev mode and tests)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` with one put_object (S3 puts are atomic)."""
        validate_key(key)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=_check_data(key, data))

    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; NotFoundError naming the key when absent."""
        from botocore.exceptions import ClientError

        validate_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND_CODES:
                raise NotFoundError(f"artifact {key!r} not found in s3://{self.bucket}") from exc
            raise
        body: bytes = response["Body"].read()
        return body

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        validate_key(key)
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise
        return head

    def exists(self, key: str) -> bool:
        """Return True if the object exists."""
        return self._head(key) is not None

    def size(self, key: str) -> int:
        """Return the object's ContentLength; NotFoundError when absent."""
        head = self._head(key)
        if head is None:
            raise NotFoundError(f"artifact {key!r} not found in s3://{self.bucket}")
        return int(head["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        """Return the sorted keys under `prefix`, following pagination."""
        validate_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete the object; S3 answers success when it is absent."""
        validate_key(key)
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def url(self, key: str, *, expires_s: int = 3600) -> str:
        """Return a presigned GET URL valid for `expires_s` seconds."""
        validate_key(key)
        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise BadInputError(f"expires_s must be between 1 and 604800, got {expires_s}")
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return url


def make_store(url: str) -> ArtifactStore:
    """Return an S3Store for `s3://bucket`, a LocalStore for a path or file:// URI."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc or parsed.path.strip("/"):
            raise BadInputError(f"artifact store URL {url!r} must be s3://bucket with no path")
        return S3Store(parsed.netloc)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if not url:
        raise BadInputError("artifact store URL is empty")
    return LocalStore(Path(url))
