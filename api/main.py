"""The FastAPI app: `uvicorn api.main:app` (settings read at start-up) or `create_app(settings)`.

Importing this module does not import torch and does not read settings; the lifespan
start-up does both checks (a missing setting stops start-up with a message naming it)
and builds the stores, the key resolver and the dispatcher once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.auth import KeyResolver
from api.errors import install_error_handlers
from api.quotas import ApiLimits
from api.routes import catalog, events, health, inputs, jobs, models
from api.ui.routes import install_ui
from modules.pipeline.settings import (
    Settings,
    SettingsError,
    build_services,
    create_dev_resources,
    get_settings,
)
from workers.dispatch import InlineDispatcher, make_dispatcher

logger = logging.getLogger("api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` overrides the environment (tests, embedding)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            resolved = (settings or get_settings()).require("api")
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise
        services = build_services(resolved)
        keys = KeyResolver(resolved)
        if resolved.dev_mode:
            create_dev_resources(services)
            keys.ensure_table()
        dispatcher = make_dispatcher(resolved, services)
        app.state.settings = resolved
        app.state.services = services
        app.state.keys = keys
        app.state.dispatcher = dispatcher
        app.state.limits = ApiLimits(resolved)
        try:
            yield
        finally:
            if isinstance(dispatcher, InlineDispatcher):
                dispatcher.shutdown(wait=False)

    app = FastAPI(
        title="MCaaS",
        summary="Model Compression as a Service",
        version="0.1.0",
        lifespan=lifespan,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    for module in (health, models, inputs, jobs, catalog):
        app.include_router(module.router)
    # Job progress as Server-Sent Events, and the dashboard's pages under /ui.
    app.include_router(events.router)
    install_ui(app)
    return app


app = create_app()
