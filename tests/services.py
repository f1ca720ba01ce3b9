"""Finding the real services integration tests run against.

Order: the ``QX_TEST_*_URL`` environment variable, else the local default address; if that
does not answer, a testcontainers container when a Docker engine answers; otherwise the
test is skipped with a message saying how to provide the service.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest


@dataclass(frozen=True)
class Service:
    name: str
    env_var: str
    default_url: str
    start_container: Callable[[], tuple[str, Any]] | None = None


def _reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url.replace("+asyncpg", "").replace("+aiosqlite", ""))
    host = parts.hostname or "127.0.0.1"
    port = parts.port
    if port is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


_resolved: dict[str, str] = {}
_containers: list[Any] = []


def resolve(service: Service) -> str:
    """Return a URL where ``service`` answers, or skip the calling test."""
    if service.name in _resolved:
        return _resolved[service.name]
    url = os.environ.get(service.env_var, service.default_url)
    if _reachable(url):
        _resolved[service.name] = url
        return url
    if service.start_container is not None and docker_available():
        url, container = service.start_container()
        _containers.append(container)
        _resolved[service.name] = url
        return url
    pytest.skip(
        f"{service.name} is not reachable at {url}: set {service.env_var} to a running "
        f"{service.name}, start one with `docker compose up -d {service.name.lower()}`, "
        "or run a Docker engine so testcontainers can start it"
    )


def stop_containers() -> None:
    while _containers:
        _containers.pop().stop()


def _postgres_container() -> tuple[str, Any]:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16", driver="asyncpg").start()
    return container.get_connection_url(), container


POSTGRES = Service(
    name="PostgreSQL",
    env_var="QX_TEST_DATABASE_URL",
    default_url="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    start_container=_postgres_container,
)


def _generic_container(image: str, port: int, scheme: str, command: str | None = None) -> Any:
    def start() -> tuple[str, Any]:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer(image).with_exposed_ports(port)
        if command:
            container = container.with_command(command)
        container.start()
        wait_for_logs(container, ".", timeout=60)
        host, mapped = container.get_container_host_ip(), container.get_exposed_port(port)
        return f"{scheme}://{host}:{mapped}", container

    return start


NATS = Service(
    name="NATS",
    env_var="QX_TEST_NATS_URL",
    default_url="nats://127.0.0.1:4222",
    start_container=_generic_container("nats:2", 4222, "nats", "-js"),
)
AMQP = Service(
    name="RabbitMQ",
    env_var="QX_TEST_AMQP_URL",
    default_url="amqp://guest:guest@127.0.0.1:5672/",
    start_container=_generic_container("rabbitmq:3", 5672, "amqp"),
)
REDIS = Service(
    name="Redis",
    env_var="QX_TEST_REDIS_URL",
    default_url="redis://127.0.0.1:6379/0",
    start_container=_generic_container("redis:7", 6379, "redis"),
)
