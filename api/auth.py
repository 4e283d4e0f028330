"""API keys: from MCAAS_API_KEYS and/or a DynamoDB table keyed by the key's sha256.

The user id always comes from the key, never from the request. Keys are compared with
`secrets.compare_digest`, against every configured key, so the time taken does not say
how much of a guess matched. The table stores only sha256(key), never the key.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from modules.pipeline.settings import Settings
from modules.storage.keys import validate_user_id

API_KEY_HEADER = "X-API-Key"
MAX_KEY_LENGTH = 256


def key_digest(key: str) -> str:
    """The table's partition key for an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyResolver:
    """Maps an API key to its user id, or None."""

    def __init__(self, settings: Settings, *, client: Any = None) -> None:
        self.static = settings.api_key_map()
        self.table = settings.api_keys_table
        self.region = settings.aws_region
        self._client = client

    @property
    def client(self) -> Any:
        """The boto3 DynamoDB client, created on first use."""
        if self._client is None:
            import boto3

            self._client = boto3.client("dynamodb", region_name=self.region)
        return self._client

    def user_for(self, key: str) -> str | None:
        """The user the key belongs to, or None when it is unknown or malformed."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        given = key.encode("utf-8")
        found: str | None = None
        for known, user in self.static.items():
            # No early exit: every key is compared whichever matches.
            if secrets.compare_digest(known.encode("utf-8"), given):
                found = user
        if found is not None or self.table is None:
            return found
        digest = key_digest(key)
        item = self.client.get_item(
            TableName=self.table, Key={"key_sha256": {"S": digest}}, ConsistentRead=True
        ).get("Item")
        if item is None or item.get("disabled", {}).get("BOOL", False):
            return None
        if not secrets.compare_digest(item["key_sha256"]["S"], digest):
            return None
        return validate_user_id(item["user_id"]["S"])

    def ensure_table(self) -> None:
        """Create the key table if missing (dev mode only)."""
        from botocore.exceptions import ClientError

        if self.table is None:
            return
        try:
            self.client.describe_table(TableName=self.table)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
        self.client.create_table(
            TableName=self.table,
            AttributeDefinitions=[{"AttributeName": "key_sha256", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "key_sha256", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        self.client.get_waiter("table_exists").wait(TableName=self.table)

    def add_key(self, key: str, user_id: str) -> None:
        """Store sha256(key) -> user_id (used by operators' scripts and tests)."""
        if self.table is None:
            raise ValueError("MCAAS_API_KEYS_TABLE is not set")
        self.client.put_item(
            TableName=self.table,
            Item={
                "key_sha256": {"S": key_digest(key)},
                "user_id": {"S": validate_user_id(user_id)},
            },
        )
