"""FastAPI dependencies shared by the routes: the server context and the calling user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from twinkle.hub import HubCredentials
from twinkle.protocol.wire import HUB_TOKEN_HEADERS

from .auth import authenticate
from .context import ServerContext
from .store import User

# auto_error=False: a missing key is reported by ``authenticate`` as our own 401 ErrorResponse.
# Declared for the OpenAPI schema, which then shows every route but health as needing a key.
_bearer = HTTPBearer(auto_error=False, description="the API key from `twinkle-server users add`")


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def current_user(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> User:
    """The user whose key is in ``Authorization: Bearer <key>``; 401 otherwise.

    A sync dependency, so FastAPI runs the database lookup off the event loop.
    """
    return authenticate(get_ctx(request).store, request.headers.get("authorization"))


def hub_credentials_of(request: Request) -> HubCredentials:
    """The caller's own hub tokens, from the request's headers (none: anonymous)."""
    tokens = {scheme: request.headers.get(header) or None for scheme, header in HUB_TOKEN_HEADERS.items()}
    return HubCredentials(**tokens)


CurrentUser = Annotated[User, Depends(current_user)]
"""A route parameter: the authenticated caller."""
Ctx = Annotated[ServerContext, Depends(get_ctx)]
"""A route parameter: the server context."""
Hub = Annotated[HubCredentials, Depends(hub_credentials_of)]
"""A route parameter: the caller's hub credentials, for the work done for them."""
