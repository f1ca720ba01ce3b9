"""An HTTP service over the orders context (needs the ``api`` extra: FastAPI, uvicorn).

Endpoints: ``POST /products`` (stock), ``POST /orders``, ``GET /orders?status=&sort=&cursor=``,
``GET /orders/{id}``, ``POST /orders/{id}/pay``, ``POST /orders/{id}/ship``,
``POST /orders/{id}/cancel``. Each request runs in a request context built from
``X-Tenant-ID`` and ``X-Correlation-ID`` (echoed back, generated when absent); an
``Idempotency-Key`` header makes ``POST /orders`` safe to repeat (per tenant; the same key
with another body is 422, a repeat while the first is running 409). Every error is an
``application/problem+json`` response, documented in the OpenAPI schema: 400 a missing or
malformed ``X-Tenant-ID``, 404 not found (unknown routes too), 405 a wrong method, 409
conflicts and broken business rules, 422 invalid input, 503 a transient failure.

Example:
    >>> app = create_app(settings=load_settings())     # doctest: +SKIP
    >>> uvicorn.run(app)                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from enum import StrEnum
from typing import Any
from uuid import UUID

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from qx.core._context import request_context
from qx.core._errors import (
    Conflict,
    IdempotencyKeyReused,
    InvalidQuery,
    NotFound,
    QxError,
    TenantRequired,
    TenantViolation,
    TransientError,
)
from qx.core._ids import new_id
from qx.cqrs import consistency_token
from qx.db import Replicas, UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.application import (
    CancelOrder,
    GetOrder,
    LineRequest,
    ListOrders,
    OrderView,
    PayOrder,
    PlaceOrder,
    ShipOrder,
    StockProduct,
    build_bus,
)
from qx.examples.orders.domain import OrderError
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.settings import QxSettings, load_settings

__all__ = ["create_app"]

logger = logging.getLogger("qx.examples.orders.api")

PROBLEM = "application/problem+json"
#: What an X-Tenant-ID may be: it is stored in every row (tenant_column is 64 characters).
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CORRELATION = re.compile(r"[\x21-\x7e]{1,128}")
# W3C trace context: version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class Problem(BaseModel):
    """An RFC 9457 problem detail, the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = None


class Status(StrEnum):
    """The order states a list may be filtered by."""

    placed = "placed"
    paid = "paid"
    shipped = "shipped"
    cancelled = "cancelled"


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": title, "content": {PROBLEM: {}}}
    for status, title in (
        (400, "Missing or malformed X-Tenant-ID"),
        (404, "Not found"),
        (409, "Conflict: a business rule, a concurrent change, or a request still in flight"),
        (422, "Invalid input, or an Idempotency-Key reused with another request"),
        (503, "A transient failure: retry"),
    )
}


def tenant_header(
    x_tenant_id: str = Header(
        ...,
        description="The tenant every read and write is scoped to.",
        max_length=64,
        pattern=TENANT_PATTERN.pattern,
    ),
) -> str:
    """Documents the header the request-context middleware reads (and checks first)."""
    return x_tenant_id


class LineIn(BaseModel):
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=10_000)


class OrderIn(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    lines: list[LineIn] = Field(min_length=1, max_length=100)


class ProductIn(BaseModel):
    sku: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    price: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    quantity: int = Field(gt=0)


class LineOut(BaseModel):
    sku: str
    quantity: int
    unit_price: Decimal


class OrderOut(BaseModel):
    id: UUID
    customer: str
    status: str
    total: Decimal
    lines: list[LineOut]
    version: int

    @classmethod
    def of(cls, view: OrderView) -> OrderOut:
        return cls(
            id=view.id,
            customer=view.customer,
            status=view.status,
            total=view.total,
            lines=[LineOut(sku=s, quantity=q, unit_price=p) for s, q, p in view.lines],
            version=view.version,
        )


class OrderPageOut(BaseModel):
    items: list[OrderOut]
    next_cursor: str | None
    prev_cursor: str | None


def _hand_token(response: Response) -> str | None:
    # The command's consistency token goes back to the client, which sends it with its next
    # reads (X-Consistency-Token): they then see this command's writes, even on a replica.
    token = consistency_token()
    if token is not None:
        response.headers["X-Consistency-Token"] = token
    return token


async def _read_own_write(bus: Any, response: Response, query: Any) -> Any:
    token = _hand_token(response)
    if token is None:
        return await bus.ask(query)
    with request_context(consistency_token=token):
        return await bus.ask(query)


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, NotFound):
        return 404, "Not Found"
    if isinstance(exc, IdempotencyKeyReused):
        return 422, "Unprocessable Content"
    if isinstance(exc, TenantRequired):
        return 400, "Tenant Required"
    if isinstance(exc, TenantViolation):
        return 403, "Forbidden"
    if isinstance(exc, Conflict | OrderError):
        return 409, "Conflict"
    if isinstance(exc, InvalidQuery):
        return 422, "Unprocessable Content"
    if isinstance(exc, TransientError):
        return 503, "Service Unavailable"
    return 500, "Internal Server Error"


def create_app(
    *,
    settings: QxSettings | None = None,
    engine: AsyncEngine | None = None,
) -> FastAPI:
    """Build the orders service.

    Args:
        settings: database, pagination secret (``QX_PAGINATION_SECRET``); default: from the
            environment.
        engine: use this engine (left open on shutdown) instead of one from ``settings``.
    """
    config = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        active = engine if engine is not None else create_engine(config)
        secret = config.pagination_secret
        if secret is None:
            # An example service: cursors from a previous process will read as invalid.
            logger.warning("QX_PAGINATION_SECRET is not set; using a per-process secret")
        bus = build_bus()
        # QX_DB__REPLICAS: queries read on replicas, each no older than the client's token.
        replicas = Replicas.from_settings(config.db)
        factory = UnitOfWorkFactory(
            OrdersUnitOfWork,
            create_session_factory(active),
            dispatcher=bus,
            cursor_secret=secret or secrets.token_urlsafe(32),
            replicas=replicas,
        )
        bus.provide(uow_factory=factory)
        app.state.bus = bus
        try:
            yield
        finally:
            if replicas is not None:
                await replicas.dispose()
            if own:
                await active.dispose()

    app = FastAPI(
        title="qx orders example",
        lifespan=lifespan,
        dependencies=[Depends(tenant_header)],
        responses=_ERRORS,
    )

    @app.middleware("http")
    async def context_from_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        correlation = request.headers.get("x-correlation-id") or str(new_id())
        if not _CORRELATION.fullmatch(correlation):
            correlation = str(new_id())
        tenant = request.headers.get("x-tenant-id") or None
        # The token of the client's last command: its reads see that command's writes.
        token = request.headers.get("x-consistency-token") or None
        traceparent = request.headers.get("traceparent")
        if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
            traceparent = None  # a malformed one starts a new trace, as W3C asks
        if tenant is not None and not TENANT_PATTERN.fullmatch(tenant):
            response: Response = _problem(
                400,
                "Bad Request",
                "X-Tenant-ID must be 1 to 64 letters, digits, '.', '_' or '-'",
                field="X-Tenant-ID",
            )
        else:
            with request_context(
                correlation_id=correlation,
                tenant_id=tenant,
                traceparent=traceparent,
                consistency_token=token,
            ):
                response = await call_next(request)
        response.headers["X-Correlation-ID"] = correlation
        return response

    @app.exception_handler(QxError)
    async def qx_error(_request: Request, exc: QxError) -> JSONResponse:
        status, title = _status_of(exc)
        if isinstance(exc, TenantRequired):
            # The HTTP client's mistake, in its terms (not the library's request_context).
            return _problem(400, "Bad Request", "send an X-Tenant-ID header", field="X-Tenant-ID")
        extra = {"field": exc.field} if isinstance(exc, InvalidQuery) and exc.field else {}
        return _problem(status, title, str(exc), **extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {404: "Not Found", 405: "Method Not Allowed"}
        response = _problem(exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail))
        response.headers.update(exc.headers or {})  # Allow: on a 405
        return response

    @app.exception_handler(OrderError)
    async def order_error(_request: Request, exc: OrderError) -> JSONResponse:
        return _problem(409, "Conflict", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]
        if any(error["field"].lower() == "header.x-tenant-id" for error in errors):
            return _problem(400, "Bad Request", "send an X-Tenant-ID header", field="X-Tenant-ID")
        return _problem(422, "Unprocessable Content", "the request is not valid", errors=errors)

    @app.post("/products", status_code=201)
    async def stock(product: ProductIn, request: Request, response: Response) -> dict[str, UUID]:
        ident = await request.app.state.bus.execute(
            StockProduct(
                sku=product.sku, name=product.name, price=product.price, quantity=product.quantity
            )
        )
        _hand_token(response)
        return {"id": ident}

    @app.post("/orders", status_code=201)
    async def place(
        order: OrderIn,
        request: Request,
        response: Response,
        idempotency_key: str | None = Header(default=None, max_length=200),
    ) -> OrderOut:
        bus = request.app.state.bus
        ident = await bus.execute(
            PlaceOrder(
                customer=order.customer,
                lines=tuple(
                    LineRequest(sku=line.sku, quantity=line.quantity) for line in order.lines
                ),
                idempotency_key=idempotency_key,
            )
        )
        response.headers["Location"] = f"/orders/{ident}"
        return OrderOut.of(await _read_own_write(bus, response, GetOrder(order_id=ident)))

    @app.get("/orders")
    async def list_orders(
        request: Request,
        status: Status | None = None,
        sort: str = "-created_at",
        cursor: str | None = None,
        page_size: int = 20,
    ) -> OrderPageOut:
        page = await request.app.state.bus.ask(
            ListOrders(
                status=status.value if status else None,
                sort=sort,
                cursor=cursor,
                page_size=page_size,
            )
        )
        return OrderPageOut(
            items=[OrderOut.of(view) for view in page.items],
            next_cursor=page.next_cursor,
            prev_cursor=page.prev_cursor,
        )

    @app.get("/orders/{order_id}")
    async def get_order(order_id: UUID, request: Request) -> OrderOut:
        return OrderOut.of(await request.app.state.bus.ask(GetOrder(order_id=order_id)))

    async def transition(request: Request, response: Response, command: Any) -> OrderOut:
        bus = request.app.state.bus
        await bus.execute(command)
        view = await _read_own_write(bus, response, GetOrder(order_id=command.order_id))
        return OrderOut.of(view)

    @app.post("/orders/{order_id}/pay")
    async def pay(order_id: UUID, request: Request, response: Response) -> OrderOut:
        return await transition(request, response, PayOrder(order_id=order_id))

    @app.post("/orders/{order_id}/ship")
    async def ship(order_id: UUID, request: Request, response: Response) -> OrderOut:
        return await transition(request, response, ShipOrder(order_id=order_id))

    @app.post("/orders/{order_id}/cancel")
    async def cancel(order_id: UUID, request: Request, response: Response) -> OrderOut:
        return await transition(request, response, CancelOrder(order_id=order_id))

    return app
