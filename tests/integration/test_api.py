"""The orders service over HTTP (httpx + ASGI transport), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.examples.orders.api import create_app
from qx.settings import QxSettings
from tests.integration.conftest import CURSOR_SECRET

PROBLEM = "application/problem+json"


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings=QxSettings(pagination_secret=CURSOR_SECRET), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"X-Tenant-ID": "acme"}
        ) as http:
            yield http


async def stock(
    client: httpx.AsyncClient, sku: str = "KB-01", quantity: int = 10, **headers: str
) -> None:
    response = await client.post(
        "/products",
        json={"sku": sku, "name": sku.lower(), "price": "49.90", "quantity": quantity},
        headers=headers,
    )
    assert response.status_code == 201, response.text


async def place(client: httpx.AsyncClient, quantity: int = 2, **headers: str) -> httpx.Response:
    return await client.post(
        "/orders",
        json={"customer": "ada", "lines": [{"sku": "KB-01", "quantity": quantity}]},
        headers=headers,
    )


async def test_place_get_pay_ship_list(client: httpx.AsyncClient) -> None:
    await stock(client)
    created = await place(client, 2, **{"X-Correlation-ID": "req-1"})
    assert created.status_code == 201, created.text
    assert created.headers["X-Correlation-ID"] == "req-1"
    order = created.json()
    assert order["status"] == "placed" and order["total"] == "99.80"
    assert created.headers["Location"] == f"/orders/{order['id']}"
    fetched = await client.get(f"/orders/{order['id']}")
    assert fetched.status_code == 200 and fetched.json()["id"] == order["id"]
    assert fetched.headers["X-Correlation-ID"]  # generated when absent
    paid = await client.post(f"/orders/{order['id']}/pay")
    assert paid.json()["status"] == "paid"
    shipped = await client.post(f"/orders/{order['id']}/ship")
    assert shipped.status_code == 200 and shipped.json()["status"] == "shipped"
    for _ in range(4):
        assert (await place(client, 1)).status_code == 201
    listing = await client.get("/orders", params={"status": "placed", "page_size": 3})
    page = listing.json()
    assert listing.status_code == 200 and len(page["items"]) == 3 and page["next_cursor"]
    rest = await client.get(
        "/orders", params={"status": "placed", "page_size": 3, "cursor": page["next_cursor"]}
    )
    assert len(rest.json()["items"]) == 1 and rest.json()["next_cursor"] is None
    ids = {o["id"] for o in page["items"]} | {o["id"] for o in rest.json()["items"]}
    assert len(ids) == 4 and order["id"] not in ids
    victim = page["items"][0]["id"]
    cancelled = await client.post(f"/orders/{victim}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = await client.post(f"/orders/{victim}/cancel")
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM


async def test_error_mapping_is_problem_json(client: httpx.AsyncClient) -> None:
    await stock(client, quantity=3)
    cases: list[tuple[Any, int]] = [
        (client.get("/orders/01a20000-0000-7000-8000-000000000000"), 404),
        (client.get("/orders/not-a-uuid"), 422),
        (client.post("/orders", json={"customer": "", "lines": []}), 422),
        (
            client.post(
                "/orders", json={"customer": "x", "lines": [{"sku": "NOPE", "quantity": 1}]}
            ),
            404,
        ),
        (place(client, 5), 409),  # out of stock: the whole command fails
        (client.get("/orders", params={"sort": "secret"}), 422),
        (client.get("/orders", params={"cursor": "garbage"}), 422),
        (client.get("/orders", headers={"X-Tenant-ID": ""}), 400),
    ]
    for call, status in cases:
        response = await call
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["status"] == status and body["title"] and body["detail"]
    order = (await place(client, 1)).json()
    conflict = await client.post(f"/orders/{order['id']}/ship")  # not paid yet
    assert conflict.status_code == 409 and "cannot ship" in conflict.json()["detail"]
    # Stock was untouched by the failed order: 3 - 1 = 2 left, so 2 more succeed.
    assert (await place(client, 2)).status_code == 201
    assert (await place(client, 1)).status_code == 409


async def test_tenant_isolation_through_headers(client: httpx.AsyncClient) -> None:
    await stock(client)
    await stock(client, **{"X-Tenant-ID": "globex"})
    mine = (await place(client)).json()
    theirs = (await place(client, **{"X-Tenant-ID": "globex"})).json()
    assert (await client.get(f"/orders/{theirs['id']}")).status_code == 404
    assert (await client.post(f"/orders/{theirs['id']}/pay")).status_code == 404
    listed = (await client.get("/orders")).json()["items"]
    assert [o["id"] for o in listed] == [mine["id"]]
    other = (await client.get("/orders", headers={"X-Tenant-ID": "globex"})).json()["items"]
    assert [o["id"] for o in other] == [theirs["id"]]


async def test_idempotency_key_returns_the_first_result(client: httpx.AsyncClient) -> None:
    await stock(client, quantity=4)
    first = await place(client, 2, **{"Idempotency-Key": "k-1"})
    again = await place(client, 2, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert len((await client.get("/orders")).json()["items"]) == 1
    # Only 2 of 4 items were reserved: a different key can take the other 2.
    assert (await place(client, 2, **{"Idempotency-Key": "k-2"})).status_code == 201


@pytest.mark.postgres_only
async def test_concurrent_commands_on_one_order_never_leak_conflicts(
    client: httpx.AsyncClient,
) -> None:
    await stock(client)
    order = (await place(client, 1)).json()
    calls = [client.post(f"/orders/{order['id']}/{'pay' if i % 2 else 'ship'}") for i in range(20)]
    responses = await asyncio.gather(*calls)
    statuses = [r.status_code for r in responses]
    # Each command either succeeds or breaks a business rule (409 "cannot ..."); a lost
    # optimistic-concurrency race is retried by the bus, never returned.
    assert set(statuses) <= {200, 409}
    for response in responses:
        if response.status_code == 409:
            assert response.json()["detail"].startswith("cannot"), response.text
    assert statuses.count(200) >= 1


async def test_idempotency_keys_are_per_tenant_and_bound_to_the_body(
    client: httpx.AsyncClient,
) -> None:
    await stock(client, quantity=4)
    await stock(client, quantity=4, **{"X-Tenant-ID": "globex"})
    acme = await place(client, 1, **{"Idempotency-Key": "k-1"})
    globex = await place(client, 1, **{"Idempotency-Key": "k-1", "X-Tenant-ID": "globex"})
    assert acme.status_code == globex.status_code == 201
    assert acme.json()["id"] != globex.json()["id"]  # globex's order placed, nothing leaked
    assert (await client.get(f"/orders/{globex.json()['id']}")).status_code == 404
    other_body = await place(client, 3, **{"Idempotency-Key": "k-1"})
    assert other_body.status_code == 422, other_body.text
    assert other_body.headers["content-type"] == PROBLEM
    assert "different PlaceOrder" in other_body.json()["detail"]
    listed = (await client.get("/orders")).json()["items"]
    assert [o["id"] for o in listed] == [acme.json()["id"]]


async def test_every_error_is_problem_json(client: httpx.AsyncClient) -> None:
    cases = [
        (client.get("/orders", headers={"X-Tenant-ID": "t" * 100}), 400),
        (client.get("/orders", headers={"X-Tenant-ID": "a b"}), 400),
        (client.get("/orders", headers={"X-Tenant-ID": ""}), 400),
        (client.get("/no/such/route"), 404),
        (client.delete("/orders"), 405),
        (client.get("/orders", params={"status": "bogus"}), 422),
        (client.get("/orders", params={"page_size": "many"}), 422),
    ]
    for call, status in cases:
        response = await call
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"] == PROBLEM, response.headers
        body = response.json()
        assert body["status"] == status and body["title"] and body["detail"]
        assert "SQLSTATE" not in body["detail"] and "sqlalchemy" not in body["detail"].lower()
    missing = await client.get("/orders", headers={"X-Tenant-ID": ""})
    assert missing.json()["detail"] == "send an X-Tenant-ID header"
    assert "allow" in (await client.delete("/orders")).headers


async def test_the_openapi_schema_documents_the_tenant_header_and_problem_responses(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            names = {
                p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"
            }
            assert "x-tenant-id" in names, (method, path)
            for status in ("400", "404", "409", "422"):
                response = operation["responses"][status]
                assert PROBLEM in response["content"], (method, path, status)
    problem = schema["components"]["schemas"]["Problem"]
    assert {"title", "status", "detail"} <= set(problem["properties"])
