"""The public names of each package, pinned: a change here is an API change."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

EXPECTED = {
    "qx.testing": ["InMemoryStore", "InMemoryUnitOfWorkFactory", "MemoryPublisher"],
    "qx.cqrs": [
        "Command",
        "HandlerContext",
        "IdempotencyPolicy",
        "Message",
        "MessageBus",
        "Middleware",
        "Next",
        "Query",
        "RetryPolicy",
        "consistency_token",
        "idempotency_middleware",
        "idempotency_result_middleware",
        "logging_middleware",
        "purge_idempotency_keys",
        "read_only_middleware",
        "retry_middleware",
        "unit_of_work_middleware",
    ],
    "qx.migrations": [
        "QX_BRANCH",
        "QX_VERSIONS",
        "CreateOutboxNotifyOp",
        "DropOutboxNotifyOp",
        "alembic_config",
        "assert_schema_current",
        "compare_type",
        "configure_context",
        "current",
        "describe_difference",
        "downgrade",
        "init_environment",
        "known_tables_only",
        "load_metadata",
        "new_revision",
        "project_migrations",
        "render_item",
        "run_migrations",
        "schema_differences",
        "stamp",
        "upgrade",
    ],
    "qx": [
        "AggregateRoot",
        "CommitOutcomeUnknown",
        "ConcurrencyConflict",
        "ConfigurationError",
        "Conflict",
        "DomainEvent",
        "DuplicateKey",
        "Event",
        "EventDispatcher",
        "InProcessDispatcher",
        "IntegrationEvent",
        "IntegrityViolation",
        "InvalidCursor",
        "InvalidQuery",
        "NotFound",
        "Page",
        "Q",
        "QxError",
        "QxSettings",
        "Repository",
        "RequestContext",
        "TenantRequired",
        "TenantViolation",
        "TransientError",
        "UnitOfWork",
        "UnitOfWorkError",
        "UnitOfWorkFactory",
        "__version__",
        "create_engine",
        "create_session_factory",
        "current_context",
        "load_settings",
        "new_id",
        "request_context",
        "system_context",
    ],
    "qx.core": [
        "AggregateRoot",
        "Clock",
        "DomainEvent",
        "Event",
        "EventDispatcher",
        "EventHandler",
        "FixedClock",
        "InProcessDispatcher",
        "IntegrationEvent",
        "RecordedEvent",
        "RequestContext",
        "SystemClock",
        "current_context",
        "new_id",
        "request_context",
        "system_context",
        "utcnow",
        "uuid7_timestamp_ms",
    ],
    "qx.errors": [
        "BrokerUnavailable",
        "CommitOutcomeUnknown",
        "ConcurrencyConflict",
        "ConfigurationError",
        "Conflict",
        "DatabaseError",
        "DuplicateKey",
        "HandlerNotFound",
        "IdempotencyKeyReused",
        "IntegrityViolation",
        "InvalidConsistencyToken",
        "InvalidCursor",
        "InvalidMessage",
        "InvalidQuery",
        "NotFound",
        "OutOfOrder",
        "PublishError",
        "QxError",
        "RequestInFlight",
        "StatementTimeout",
        "TenantRequired",
        "TenantViolation",
        "TransientError",
        "UnitOfWorkError",
    ],
    "qx.db.query": ["CursorCodec", "Page", "Q", "QuerySet"],
    "qx.db": [
        "NAMING_CONVENTION",
        "WITH_DELETED",
        "CommitContext",
        "CommitStage",
        "EntityInfo",
        "QxSession",
        "Replicas",
        "Repository",
        "UnitOfWork",
        "UnitOfWorkFactory",
        "UnitOfWorkState",
        "WriteStatement",
        "audit_columns",
        "configure_mappers",
        "create_engine",
        "create_session_factory",
        "entity_info",
        "json_column",
        "make_metadata",
        "make_registry",
        "map_aggregate",
        "map_entity",
        "parse_database_url",
        "soft_delete_column",
        "tenant_column",
        "translate_error",
        "translating",
        "uuid_pk",
        "version_column",
    ],
    "qx.outbox.publishers": [
        "Described",
        "KafkaPublisher",
        "LogPublisher",
        "NatsPublisher",
        "Probed",
        "Publisher",
        "RabbitPublisher",
        "RedisPublisher",
        "publish_many",
        "publisher_from_settings",
    ],
    "qx.outbox": [
        "BatchResult",
        "Envelope",
        "EventRouter",
        "Inbox",
        "InboxMetrics",
        "InboxService",
        "KafkaSubscriber",
        "NatsSubscriber",
        "OutboxProblem",
        "OutboxRelay",
        "OutboxStage",
        "OutboxStatus",
        "OutboxStore",
        "ParkedMessage",
        "PrometheusMetrics",
        "RabbitSubscriber",
        "RedisSubscriber",
        "RelayMetrics",
        "RelayState",
        "inbox_table",
        "include_qx_tables",
        "new_metadata",
        "outbox_table",
        "qx_metadata",
    ],
}


def _isort_key(name: str) -> tuple[int, str]:
    # ruff counts a one-letter name ("Q") as a class, not a constant.
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_public_api_is_pinned_and_sorted(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == EXPECTED[module_name]
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical.
    assert sorted(module.__all__, key=_isort_key) == list(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name


PUBLIC_PACKAGES = sorted(
    set(EXPECTED) | {"qx.db.types", "qx.errors", "qx.outbox.publishers", "qx.settings"}
)


def test_each_public_name_has_one_import_path() -> None:
    # Defined in one public module; only the top-level `qx` re-exports a curated set (issue 23).
    where: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for module_name in PUBLIC_PACKAGES:
        if module_name == "qx":
            continue
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, (str, int, float, frozenset, tuple)):
                key = hash((module_name, name))  # equal constants are not the same name
            else:
                key = id(value)
            where.setdefault(key, []).append(module_name)
            names[key] = name
    twice = {names[key]: paths for key, paths in where.items() if len(paths) > 1}
    assert twice == {}


def test_the_top_level_package_re_exports_only_public_names() -> None:
    import qx

    for name in qx.__all__:
        if name == "__version__":
            continue
        value = getattr(qx, name)
        homes = [
            m
            for m in PUBLIC_PACKAGES
            if m != "qx"
            and getattr(importlib.import_module(m), name, None) is value
            and name in importlib.import_module(m).__all__
        ]
        assert len(homes) == 1, (name, homes)


def test_error_tree_has_one_root() -> None:
    import qx.errors as errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.QxError)


def test_importing_qx_creates_no_engine_or_connection() -> None:
    # A fresh interpreter: this process already holds the engines other tests made.
    code = (
        "import gc, sys\n"
        "import qx, qx.db, qx.outbox, qx.settings, qx.cli\n"
        "from sqlalchemy.ext.asyncio import AsyncEngine\n"
        "from sqlalchemy.engine import Engine\n"
        "found = [o for o in gc.get_objects() if isinstance(o, (AsyncEngine, Engine))]\n"
        "sys.exit(len(found))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
