"""The error types every layer raises; the CLI maps them to exit 2, the API to a 4xx."""

from __future__ import annotations


class McaasError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"


class BadInputError(McaasError, ValueError):
    """The caller gave something we cannot use: it names the problem (CLI exit 2, HTTP 400)."""

    code = "bad_input"


class InvalidParamsError(BadInputError):
    """A job spec or step params fail validation; the message names each field (HTTP 422)."""

    code = "invalid_request"


class NotFoundError(BadInputError):
    """A named thing (step, profile, dataset, arch, model, job) does not exist (HTTP 404)."""

    code = "not_found"


class UnsafeModelError(BadInputError):
    """A model file would need unsafe deserialization, or failed a safety check (HTTP 422)."""

    code = "unsafe_model"


class ModelFormatError(BadInputError):
    """A model file is missing, truncated, corrupt or of the wrong type (HTTP 422)."""

    code = "bad_model"


class IncompatibleError(BadInputError):
    """Model, dataset and step do not fit together, e.g. feature counts differ (HTTP 422)."""

    code = "incompatible"
