"""Infrastructure on SQLAlchemy 2 asyncio: engine, mapping, repositories, unit of work."""

from qx.db._engine import create_engine, create_session_factory, parse_database_url
from qx.db._mapping import (
    NAMING_CONVENTION,
    audit_columns,
    configure_mappers,
    entity_info,
    json_column,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    soft_delete_column,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.db._model import EntityInfo
from qx.db._pipeline import CommitContext, CommitStage
from qx.db._replicas import Replicas
from qx.db._repository import Repository
from qx.db._scoping import WITH_DELETED
from qx.db._session import QxSession
from qx.db._translate import translate_error, translating
from qx.db._uow import UnitOfWork, UnitOfWorkFactory, UnitOfWorkState
from qx.db._writes import WriteStatement

__all__ = [
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
]
