"""The insert fast path: a transaction that only creates aggregates skips the ORM flush.

Creating an order with its lines is the hottest write path of most services. A repository
notes the new objects it is given on the transaction rather than handing them to the session
(whatever else uses the session takes them in first: ``QxSession.take_in_new``). When a
unit of work holds nothing but new objects of plainly mapped classes, qx writes them with one
multi-row Core INSERT per table (parents first, foreign keys copied from the parents as the
flush would), then leaves the objects detached with their identity, as flushed rows are
once the session closes - the same rows, stamps and errors as the flush, without its
per-object machinery. The rows
are held back to go with the commit stages' rows (the outbox's), as one statement where the
backend can (``qx.db._writes``).

A primary key the database generates (an autoincrement integer left ``None``) is read back
with ``RETURNING`` in the order the rows were given, then copied into the children, as the
flush does, before their own INSERT.

Anything unusual falls back to the regular flush: loaded, changed or deleted objects in the
session, mapper or flush event listeners, inheritance, links other than owned one-to-many
collections, a key left ``None`` that the database does not generate (or left by some rows
of a table and given by others), or ``None`` in a column that has a default.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, Session, make_transient, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.interfaces import ONETOMANY
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.util import sort_tables

from qx.core._context import current_context
from qx.db._mapping import entity_info
from qx.db._model import InsertPlan, Unset, model_of
from qx.db._session import QxSession, in_aggregate, refuse_writes, stamp_new
from qx.db._tracking import members, transaction_of
from qx.db._writes import WriteStatement, defer_write, execute_write, own_columns

__all__ = ["forget_inserted", "insert_new_aggregates", "writes_directly"]

_MISSING: Final = object()


def _plan(mapper: Mapper[Any]) -> InsertPlan | None:
    model = model_of(mapper)
    if isinstance(model.insert_plan, Unset):
        model.insert_plan = _build_plan(mapper)
    return model.insert_plan


def writes_directly(mapper: Mapper[Any]) -> bool:
    """Whether new instances of ``mapper`` can be written by this path (a plain mapping,
    no insert listeners); the session's state decides at commit."""
    return _plan(mapper) is not None


def _build_plan(mapper: Mapper[Any]) -> InsertPlan | None:
    own = own_columns(mapper)
    if own is None or mapper.dispatch.before_insert or mapper.dispatch.after_insert:
        return None
    table = mapper.local_table
    assert isinstance(table, Table)  # own_columns() says so
    columns = [
        (key, column.key, column.default is not None or column.server_default is not None)
        for key, column in own
    ]
    owned, links = [], []
    info = entity_info(mapper)
    for rel in mapper.relationships:
        pairs = rel.synchronize_pairs
        if (
            rel.key in info.owned
            and rel.direction is ONETOMANY
            and rel.secondary is None
            and pairs
            and all(parent.table is table for parent, _ in pairs)
        ):
            sync = tuple(
                (
                    mapper.get_property_by_column(parent).key,
                    rel.mapper.get_property_by_column(child).key,
                )
                for parent, child in pairs
            )
            owned.append((rel.key, sync))
        else:
            links.append(rel.key)
    pk = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)
    auto = table.autoincrement_column
    generated = None
    if auto is not None and tuple(mapper.primary_key) == (auto,):
        generated = (mapper.get_property_by_column(auto).key, auto)
    return InsertPlan(
        table,
        WriteStatement(insert(table)),
        tuple(columns),
        tuple(owned),
        tuple(links),
        pk,
        generated,
    )


def _no_flush_listeners(sync: Session) -> bool:
    dispatch = sync.dispatch
    # qx's own before_flush is the only flush listener the fast path reproduces.
    return (
        len(dispatch.before_flush) == 1
        and not dispatch.after_flush
        and not (dispatch.after_flush_postexec)
    )


def _new_objects(sync: QxSession) -> tuple[list[Any], bool] | None:
    """The new objects to write, and whether they are the session's (else the ones
    repositories added, with their parts); ``None`` when the flush must write them."""
    if sync.identity_map or sync.new or sync.deleted:
        # The session holds objects of its own (loaded ones: dirty or deleted objects are
        # among them): everything goes through its bookkeeping.
        sync.take_in_new()
        if sync.identity_map or not sync.new or not _no_flush_listeners(sync):
            return None
        return list(sync.new), True
    unattached = transaction_of(sync).unattached
    if not unattached or not _no_flush_listeners(sync):
        return None
    found: list[Any] = []
    seen: set[int] = set()
    # Each root then its parts, in the order added and held: the order the session's
    # cascade finds them, and so the order their rows are inserted (which a collection
    # without ORDER BY loads them in, on most backends).
    stack = list(reversed(unattached.values()))
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        state = instance_state(obj)
        plan = _plan(state.mapper)
        if plan is None or state.key is not None or state.session_id is not None:
            return None  # a part of another kind, or stored already: the flush's case
        for key, _ in reversed(plan.owned):
            stack.extend(reversed(list(members(state.dict.get(key)))))
    return found, False


async def insert_new_aggregates(session: AsyncSession) -> list[Any] | None:
    """Insert the new objects of the unit of work without a flush; ``None`` when not
    applicable (then the flush writes them).

    Called by the unit of work at commit, before the regular flush. On success the objects
    are written (in this transaction) and detached-with-identity, like flushed rows after the
    session closes, and returned: if the transaction then fails, the caller makes them
    transient again (:func:`forget_inserted`), as a rolled-back flush would.
    """
    sync = session.sync_session
    if not isinstance(sync, QxSession):
        return None
    found = _new_objects(sync)
    if found is None:
        return None
    new, attached = found
    states = [instance_state(obj) for obj in new]
    plans: list[InsertPlan] = []
    keyless: dict[Table, bool] = {}  # per table: its rows leave the key to the database
    for state in states:
        plan = _plan(state.mapper)
        if plan is None:
            return None
        values = state.dict
        for key in plan.links:
            if values.get(key):  # a link to another object needs the flush's dependencies
                return None
        missing = any(values.get(key) is None for key in plan.pk)
        if missing and plan.generated is None:
            return None  # a key nobody generates: the flush says what is wrong
        if keyless.setdefault(plan.table, missing) is not missing:
            return None  # some rows give their key, some leave it: not one statement
        plans.append(plan)
    # What the flush copies from a parent's key into each child (later, when the parent's
    # key comes back from the database): the children's attributes, by child.
    filled: dict[int, tuple[str, ...]] = {}
    for state, plan in zip(states, plans, strict=True):
        for key, pairs in plan.owned:
            child_keys = tuple(child_key for _, child_key in pairs)
            for child in members(state.dict.get(key)):
                filled[id(child)] = child_keys
    for obj, state in zip(new, states, strict=True):
        mapper = state.mapper
        if id(obj) not in filled and not entity_info(mapper).is_root and in_aggregate(mapper):
            return None  # a part no new root holds: the flush's rule refuses it, once
    # What the before_flush hook does: the read-only check; tenant, audit and version stamps.
    tx = transaction_of(sync)
    refuse_writes(sync, tx)
    stamp_new(new, sync, current_context(), tx.clock.now(), tx)
    # Found before anything is written: a value the flush would default.
    for obj, state, plan in zip(new, states, plans, strict=True):
        values = state.dict
        skip = filled.get(id(obj), ())
        left = plan.generated[0] if keyless[plan.table] and plan.generated else None
        for attr, _, defaulted in plan.columns:
            value = values.get(attr, _MISSING)
            if (value is _MISSING or (value is None and defaulted)) and (
                attr not in skip and attr != left
            ):
                return None  # the flush would apply a default we cannot see here
    by_table: dict[Table, list[InstanceState[Any]]] = {}
    by_plan: dict[Table, InsertPlan] = {}
    for state, plan in zip(states, plans, strict=True):
        by_table.setdefault(plan.table, []).append(state)
        by_plan[plan.table] = plan
    # Parents before children; one table needs no sorting (the usual single-root case).
    tables = list(by_table) if len(by_table) == 1 else _parents_first(tuple(by_table))
    steps = [(by_plan[t], by_table[t], keyless[t]) for t in tables]
    if any(keyless[t] and by_plan[t].generated for t in tables):
        # A key comes back from the database: the statements go now, in one trip into the
        # session's greenlet (each trip costs about as much CPU as a small statement).
        await session.run_sync(_write, steps)
    else:
        # Every row is known: held back, to go with the commit's next write (qx.db._writes).
        _write(sync, steps)
    tx.flushed = True
    if attached:
        sync.expunge_all()
    else:
        tx.unattached = {}
    for obj in new:
        make_transient_to_detached(obj)
    return new


@lru_cache(maxsize=512)
def _parents_first(tables: tuple[Table, ...]) -> tuple[Table, ...]:
    """``tables`` parents first. The same few sets of tables come back on every commit, and
    sorting them walks their foreign keys each time (about a tenth of the client's time
    spent in this module on placing an order). The tables are those of mapped classes,
    which live as long as the process."""
    return tuple(sort_tables(tables))


def _write(sync: Session, steps: list[tuple[InsertPlan, list[InstanceState[Any]], bool]]) -> None:
    for plan, table_states, keyless in steps:
        generated = plan.generated if keyless else None
        rows = [_row(plan, state, generated) for state in table_states]
        # Values written into the objects' dicts, not set through their attributes: the
        # objects are about to be marked committed as a whole (make_transient_to_detached),
        # so the history and events an attribute set records would be dropped unread (a
        # tenth of a bulk insert's client instructions).
        if generated is None:
            defer_write(sync, plan.statement, rows)
        else:
            back = execute_write(sync, plan.statement, rows, returning=(generated[1],))
            key = generated[0]
            for state, row in zip(table_states, back, strict=True):
                state.dict[key] = row[0]
        # What the flush's foreign-key sync does: children take their parent's key.
        for state in table_states:
            for key, pairs in plan.owned:
                for child in members(state.dict.get(key)):
                    values = instance_state(child).dict
                    for parent_key, child_key in pairs:
                        values[child_key] = state.dict.get(parent_key)


def _row(
    plan: InsertPlan, state: InstanceState[Any], generated: tuple[str, Any] | None
) -> dict[str, Any]:
    values = state.dict
    skip = None if generated is None else generated[0]
    return {column: values.get(attr) for attr, column, _ in plan.columns if attr != skip}


def forget_inserted(objects: list[Any]) -> None:
    """Make objects written by :func:`insert_new_aggregates` transient again (their
    transaction failed), so the same objects can be added to a new unit of work."""
    for obj in objects:
        if instance_state(obj).key is not None:
            make_transient(obj)
