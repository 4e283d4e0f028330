"""What the DynamoDB job store and step log share: the lazy client, the TTL, table creation."""

from __future__ import annotations

from typing import Any

from modules.storage.aws import error_code
from modules.storage.ttl import check_ttl_days


class DynamoTable:
    """One DynamoDB table, reached through a boto3 client made on first use."""

    def __init__(
        self,
        table_name: str,
        *,
        client: Any = None,
        region: str = "us-east-1",
        ttl_days: int = 0,
    ) -> None:
        self.table_name = table_name
        self.region = region
        self._client = client
        # With ttl_days > 0 each item gets expires_at = write time + ttl_days (the table's TTL).
        self.ttl_days = check_ttl_days(ttl_days)

    @property
    def client(self) -> Any:
        """The boto3 DynamoDB client, created on first use (honours AWS_ENDPOINT_URL)."""
        if self._client is None:
            import boto3  # deferred: the SQLite and CSV defaults must not pay for boto3

            self._client = boto3.client("dynamodb", region_name=self.region)
        return self._client

    def _create_table(self, **definition: Any) -> None:
        """Create the table (PAY_PER_REQUEST) unless it exists, and wait until it does."""
        from botocore.exceptions import ClientError

        try:
            self.client.describe_table(TableName=self.table_name)
            return
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
        try:
            self.client.create_table(
                TableName=self.table_name, BillingMode="PAY_PER_REQUEST", **definition
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
        self.client.get_waiter("table_exists").wait(TableName=self.table_name)

    def _conditional(self, call: Any, **request: Any) -> Any:
        """`call(**request)`'s response, or None when its ConditionExpression did not hold."""
        from botocore.exceptions import ClientError

        try:
            return call(**request)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return None
            raise

    def _put_new(self, item: dict[str, Any]) -> bool:
        """Put `item` unless an item with its key exists (attribute_not_exists(job_id));
        False when one does: the first write is the truth, which makes retries idempotent."""
        response = self._conditional(
            self.client.put_item,
            TableName=self.table_name,
            Item=item,
            ConditionExpression="attribute_not_exists(job_id)",
        )
        return response is not None
