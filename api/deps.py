"""Dependency aliases: settings, the stores, the dispatcher and the caller's user id."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from api.auth import API_KEY_HEADER, KeyResolver
from api.errors import UnauthorizedError, UnavailableError
from modules.pipeline.engine import Dispatcher
from modules.pipeline.settings import Services, Settings, get_settings

logger = logging.getLogger("api")

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_services(request: Request) -> Services:
    """The store, step log and job store built at start-up."""
    services: Services = request.app.state.services
    return services


def get_dispatcher(request: Request) -> Dispatcher:
    """The dispatcher built at start-up."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


ServicesDep = Annotated[Services, Depends(get_services)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]

_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Your API key.")


def current_user(
    request: Request, api_key: Annotated[str | None, Security(_api_key)] = None
) -> str:
    """The user id the X-API-Key header maps to; 401 when it is missing or unknown."""
    if not api_key:
        raise UnauthorizedError(f"missing API key: send it in the {API_KEY_HEADER} header")
    resolver: KeyResolver = request.app.state.keys
    try:
        user = resolver.user_for(api_key)
    except Exception as exc:
        logger.error("API key lookup failed", exc_info=exc)
        raise UnavailableError("cannot check API keys right now; try again") from None
    if user is None:
        raise UnauthorizedError("invalid API key")
    return user


CurrentUser = Annotated[str, Depends(current_user)]
