"""What the S3 and DynamoDB clients share: reading an error's AWS code."""

from __future__ import annotations

from typing import Any


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError ("" for anything else)."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
