"""Dependencies shared by the routes, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from temporalio.client import Client

from api.auth import Principal, PrincipalDep, Role  # noqa: F401 - re-exported for the routes
from runtime.temporal import connect
from schemas.settings import Settings
from store.artifacts import ArtifactStore
from store.db import AsyncDatabase


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> AsyncDatabase:
    return request.app.state.db


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_temporal(request: Request) -> Client:
    """The app's Temporal client, connected on first use so the API can start before Temporal."""
    state = request.app.state
    if state.temporal is None:
        async with state.temporal_lock:
            if state.temporal is None:
                try:
                    state.temporal = await connect(state.settings, tracer_provider=state.tracer_provider)
                except Exception as exc:
                    raise HTTPException(
                        503,
                        f"Temporal is not reachable at {state.settings.temporal_address} ({exc}); "
                        "start the stack with `lockn-tune up`",
                    ) from None
    return state.temporal


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[AsyncDatabase, Depends(get_db)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
