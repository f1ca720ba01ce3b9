"""Settings from the environment: ``QX_`` prefix, ``__`` for nesting.

Example:
    >>> import os
    >>> os.environ["QX_DB__POOL_SIZE"] = "7"
    >>> load_settings().db.pool_size
    7
    >>> del os.environ["QX_DB__POOL_SIZE"]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from qx.core._errors import ConfigurationError

__all__ = [
    "BrokerSettings",
    "DatabaseSettings",
    "QxSettings",
    "RelaySettings",
    "ReplicaSettings",
    "load_settings",
]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./qx.sqlite3"


class ReplicaSettings(BaseModel):
    """One read replica (an item of ``QX_DB__REPLICAS``, a JSON list).

    Attributes:
        url: its SQLAlchemy URL (``postgresql+asyncpg://…``).
        weight: its share of the reads against the other replicas' (0: none).
        pool_size: connections kept open to it.
        max_overflow: extra connections allowed under load.
        pool_timeout: seconds to wait for a free connection.

    Example:
        ``QX_DB__REPLICAS='[{"url": "postgresql+asyncpg://app@replica-1/app", "weight": 3}]'``
    """

    model_config = ConfigDict(extra="forbid")

    url: str
    weight: int = Field(default=1, ge=0)
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)


class DatabaseSettings(BaseModel):
    """Database connection and pool settings (``QX_DB__*``).

    Attributes:
        url: SQLAlchemy URL; ``postgresql+asyncpg://…`` or ``sqlite+aiosqlite:///path``.
        pool_size: connections kept open (PostgreSQL).
        max_overflow: extra connections allowed under load.
        pool_timeout: seconds to wait for a free connection before ``TransientError``.
        pool_recycle: seconds after which a connection is replaced; ``-1`` never.
        pool_pre_ping: test a connection before handing it out.
        statement_timeout: seconds after which PostgreSQL cancels a statement; ``None`` off.
        search_path: PostgreSQL schemas to use (``"tenant_a,public"``); ``None`` keeps the
            server's default.
        echo: log every SQL statement.
        sqlite_begin: ``immediate`` takes SQLite's write lock at BEGIN, so concurrent units of
            work queue on ``busy_timeout`` instead of failing to upgrade a read lock.
        sqlite_busy_timeout: seconds SQLite waits for a lock.
        replicas: read replicas (PostgreSQL streaming standbys) for read-only units of work.
        replica_max_lag: seconds a replica may be behind for a read without a consistency
            token; a replica further behind is skipped.
        replica_wait: seconds a read with a consistency token waits for a replica to
            replay it before it reads on the primary.
        replica_retry: seconds a replica that refused a connection is left out.
        single_statement_commits: send a commit that is one statement without BEGIN and
            COMMIT (PostgreSQL; see "A commit that is one statement" in the failures
            guide). Turn off behind a pooler in transaction mode (PgBouncer), where a
            connection's server session changes between transactions: after a lost answer
            qx ends the server session that ran the statement, found by what it was when
            the connection was made.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = DEFAULT_DATABASE_URL
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: int = Field(default=1800, ge=-1)
    pool_pre_ping: bool = False
    statement_timeout: float | None = Field(default=None, gt=0)
    search_path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_$\", ]+$")
    echo: bool = False
    sqlite_begin: Literal["deferred", "immediate"] = "immediate"
    sqlite_busy_timeout: float = Field(default=30.0, ge=0)
    replicas: list[ReplicaSettings] = Field(default_factory=list)
    replica_max_lag: float = Field(default=10.0, ge=0)
    replica_wait: float = Field(default=1.0, ge=0)
    replica_retry: float = Field(default=5.0, ge=0)
    single_statement_commits: bool = True


class BrokerSettings(BaseModel):
    """Message broker settings (``QX_BROKER__*``).

    Attributes:
        url: ``memory://``, ``log://``, ``nats://…``, ``amqp://…``, ``redis://…`` or
            ``kafka://host:port[,host:port…]``.
        source: the CloudEvents ``source`` of published envelopes (your service's name).
        subject_prefix: NATS subjects are ``<prefix>.<event name>``.
        stream: NATS JetStream stream name (holding ``<prefix>.>``).
        create_stream: create (or update) the JetStream stream on connect.
        duplicate_window: seconds JetStream remembers a message id and drops a repeat (set
            on the stream qx creates); keep it longer than ``QX_RELAY__LEASE_SECONDS``, the
            longest a row can wait before a second relay publishes it again.
        exchange: RabbitMQ topic exchange (declared durable); routing key = event name.
        mandatory: RabbitMQ returns messages no queue is bound for, and the relay retries
            (then dead-letters) them instead of losing them silently.
        redis_stream: Redis stream key the envelopes are appended to.
        redis_maxlen: approximate ``MAXLEN`` of the Redis stream; ``None`` keeps everything.
        kafka_topic: the Kafka topic of every envelope; empty (the default): one topic per
            event name, ``<subject_prefix>.<event name>``. The record key is the aggregate,
            so an aggregate's events share a partition and keep their order.
        kafka_partitions: partitions of the topics the publisher creates.
        partitions: ``0`` (the default): NATS subjects, RabbitMQ routing keys and the Redis
            stream name only the event. ``N``: they carry the event's partition too, a hash
            of its aggregate among ``N`` (``<prefix>.p<k>.<event name>``,
            ``p<k>.<event name>``, ``<redis_stream>.p<k>``), and a consumer group's
            :class:`~qx.outbox.InboxService` gives each partition to exactly one of its
            consumers at a time. Publishers and consumers must agree on it. Kafka has its
            own partitions (``kafka_partitions``) and ignores it.
        publish_timeout: seconds to wait for the broker's acknowledgement. A message not
            acknowledged in time counts an attempt only if the broker acknowledged others
            meanwhile; otherwise the broker is unavailable and the row waits untried.
        heartbeat: seconds between liveness checks of the broker connection (NATS pings,
            RabbitMQ heartbeats, Redis health checks): a connection silent for about two
            of them is dropped and re-established.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = "memory://"
    source: str = "qx"
    subject_prefix: str = Field(default="qx", pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
    stream: str = Field(default="QX_EVENTS", pattern=r"^[A-Za-z0-9_\-]+$")
    create_stream: bool = True
    duplicate_window: float = Field(default=120.0, gt=0)
    exchange: str = "qx.events"
    mandatory: bool = True
    redis_stream: str = "qx:events"
    redis_maxlen: int | None = Field(default=None, ge=1)
    kafka_topic: str = Field(default="", pattern=r"^[A-Za-z0-9._\-]{0,249}$")
    kafka_partitions: int = Field(default=6, ge=1, le=10_000)
    partitions: int = Field(default=0, ge=0, le=1024)
    publish_timeout: float = Field(default=5.0, gt=0)
    heartbeat: float = Field(default=2.0, gt=0)


class RelaySettings(BaseModel):
    """Outbox relay settings (``QX_RELAY__*``).

    Attributes:
        batch_size: rows claimed per batch.
        poll_interval: seconds between polls when no notification arrives.
        max_attempts: failed publishes before a row is dead-lettered. A dead row parks the
            rest of its aggregate until an operator requeues it (``qx outbox requeue``).
            Broker outages are not failures: they never count an attempt.
        publish_past: event names whose dead rows do not park their aggregate: its later
            rows are published past them (the per-aggregate order then has a hole, which
            consumers see as a gap in ``aggregatesequence``).
        backoff_base: seconds before the first retry; doubles with each attempt.
        backoff_max: the longest wait between retries.
        concurrency: aggregates being published at the same time.
        run_length: rows of one aggregate a claim takes at once (beyond those it read in
            position order), so a backlog's rows of one aggregate go out together.
        pipelines: claimed batches in flight at once; a slow publish holds back only its own
            aggregate while later batches go out.
        lease_seconds: how long lanes and claimed rows stay this relay's without renewal;
            a relay that vanishes costs its peers this long.
        db_timeout: seconds any one relay transaction may take, connecting included; past
            it the connection is dropped and the relay tries again (on PostgreSQL the
            server also ends a session idle in a transaction, and keepalives find dead
            peers, after this long).
        connect_timeout: seconds to wait for the broker connection.
        shutdown_timeout: seconds SIGTERM waits for publishes in flight; rows still unsent
            are given back untried.
        log_format: ``text`` or ``json`` (one object per line) for ``qx outbox relay``.
        log_level: the relay's logging level.
        retention: seconds published rows are kept before the relay purges them; ``None``
            keeps them.
        purge_batch: rows deleted per purge statement (small, to keep locks short).
        reconnect_delay: seconds to wait after losing the database or the broker.
    """

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=200, ge=1, le=10_000)
    poll_interval: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    publish_past: frozenset[str] = frozenset()
    backoff_base: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=300.0, gt=0)
    concurrency: int = Field(default=256, ge=1, le=10_000)
    run_length: int = Field(default=16, ge=1, le=10_000)
    pipelines: int = Field(default=2, ge=1, le=16)
    retention: float | None = Field(default=7 * 24 * 3600.0, gt=0)
    purge_batch: int = Field(default=1000, ge=1)
    reconnect_delay: float = Field(default=1.0, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    db_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=20.0, gt=0)
    shutdown_timeout: float = Field(default=10.0, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class QxSettings(BaseSettings):
    """All qx settings, read from ``QX_*`` environment variables (and ``.env``).

    Attributes:
        db: database settings.
        broker: broker settings.
        relay: outbox relay settings.
        pagination_secret: key that signs keyset pagination cursors.
    """

    model_config = SettingsConfigDict(
        env_prefix="QX_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    pagination_secret: SecretStr | None = None


def load_settings(**overrides: Any) -> QxSettings:
    """Read settings from the environment, turning validation errors into qx errors.

    Raises:
        ConfigurationError: a value is missing or invalid; the message names each field.
    """
    try:
        return QxSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"QX_{'__'.join(str(p).upper() for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid qx settings: {problems}") from exc
