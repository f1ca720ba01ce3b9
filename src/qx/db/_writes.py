"""qx's own writes, which also name their transaction where the backend can.

A unit of work that wrote must know its transaction's id before COMMIT, to find out what
became of a COMMIT whose answer was lost (:mod:`qx.db._commit`). Asking costs a round trip of
its own; a write that qx emits anyway can bring the id back with its rows (PostgreSQL:
``RETURNING pg_current_xact_id()``), and then the question is never asked. Every qx write
before COMMIT that can name the transaction goes through :func:`execute_write`.

Every qx write also takes one path to the driver, :func:`_run`: the statement is compiled
once per backend and set of row keys into its SQL, where each parameter comes from, and
how its value is converted for the driver; each execution then builds the driver's
parameter tuples and hands them to the cursor as SQLAlchemy's ``Connection`` would - its
cursor events, echo logging, ``do_execute`` hooks and error handling included - without
the per-execution work of a statement it does not need here (finding the compiled form by
cache key, an execution context, a result object). On the place-order benchmark that work
was a third of the client's CPU spent executing qx's INSERTs. A statement that needs more
than parameters (Python-side column defaults, expanding ``IN``, schema translation,
several rows with ``RETURNING``) is executed by the ``Connection`` itself.

The rows of new aggregates are held back (:func:`defer_write`) and go with the transaction's
next qx write - a commit stage's rows, the outbox's - or just before COMMIT
(:func:`send_pending`). Where the backend can (PostgreSQL), all of them go as one statement
of data-modifying ``WITH`` clauses, which also names the transaction: placing an order with
its lines and its outbox row is then BEGIN, one INSERT, COMMIT, where it was BEGIN, three
INSERTs, COMMIT. Constraints see the rows of every table, as for separate statements (a
foreign key is checked at the end of the statement). A step of many rows goes on its own as
an ``executemany``: one statement per shape of rows is compiled, and many rows would make
many shapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Insert,
    Table,
    Update,
    bindparam,
    literal_column,
    select,
)
from sqlalchemy.engine.interfaces import Dialect as SADialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.util import _repr_params

from qx.db._dialect import dialect_of
from qx.db._transaction import existing_transaction

__all__ = [
    "WriteStatement",
    "defer_write",
    "execute_update",
    "execute_write",
    "held_rows",
    "names_transaction",
    "own_columns",
    "send_alone",
    "send_pending",
]

#: A step with more rows than this is not combined with others: it goes as an executemany.
COMBINED_ROWS: Final = 16
#: Nor are steps whose parameters would pass this (asyncpg takes 32,767 per statement).
COMBINED_PARAMETERS: Final = 2000


class WriteStatement:
    """An INSERT or UPDATE and the ``RETURNING`` variants of it qx runs, each built once and
    reused.

    SQLAlchemy finds a statement's compiled form by its cache key, which it derives by
    walking the statement - once per statement object (the key is memoized on it). A
    statement built per execution pays that walk every time, several times the CPU of the
    rest of a one-row INSERT. Insert plans and commit stages therefore hold one of these
    per table.

    Args:
        statement: the INSERT or UPDATE (without ``RETURNING``).
        fresh_key: a unique column each row it writes gets a value made for that write
            (a new UUID, as the outbox's event ids): a row found by it is this write's. A
            commit whose held rows include such a row can be sent as one statement without
            BEGIN and COMMIT, and still be asked about when its answer is lost
            (:func:`send_alone`).
        absent: what to do when the statement's table does not exist (the message of the
            ``ConfigurationError`` the commit raises then); ``None``: the driver's error, as
            translated.

    Example:
        >>> from sqlalchemy import Column, Integer, MetaData, Table, insert
        >>> audit = Table("audit", MetaData(), Column("n", Integer))
        >>> AUDIT = WriteStatement(insert(audit))  # once, at import
        >>> # in a CommitStage: await commit.insert(AUDIT, [{"n": len(commit.records)}])
        >>> back = AUDIT.returning([audit.c.n], ordered=False)
        >>> back is AUDIT.returning([audit.c.n], ordered=False)  # built once
        True
    """

    __slots__ = ("_forms", "_variants", "absent", "fresh_key", "statement")

    def __init__(
        self, statement: Insert | Update, *, fresh_key: str | None = None, absent: str | None = None
    ) -> None:
        self.statement = statement
        self.fresh_key = fresh_key
        self.absent = absent
        # Keyed by the columns' ids; the columns are kept in the value, so no id is reused.
        self._variants: dict[tuple[Any, ...], tuple[tuple[Any, ...], Insert | Update]] = {}
        # Per backend (held weakly: engines come and go), per variant and row keys: the
        # compiled form _run executes (None: the Connection executes it); and, on the first
        # statement of a combined write, per shape of the steps, its compiled form.
        self._forms: weakref.WeakKeyDictionary[SADialect, dict[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def returning(self, columns: Sequence[ColumnElement[Any]], *, ordered: bool) -> Insert | Update:
        """The statement with ``RETURNING columns`` (an INSERT's rows in parameter order if
        ``ordered``)."""
        key = (ordered, *map(id, columns))
        found = self._variants.get(key)
        if found is None:
            statement = self.statement
            built = (
                statement.returning(*columns, sort_by_parameter_order=True)
                if ordered and isinstance(statement, Insert)
                else statement.returning(*columns)
            )
            found = self._variants[key] = (tuple(columns), built)
        return found[1]


def execute_write(
    session: Session,
    statement: WriteStatement,
    rows: Sequence[dict[str, Any]],
    *,
    returning: Sequence[ColumnElement[Any]] = (),
) -> Sequence[Any]:
    """Execute ``statement`` with ``rows`` on the session's connection, after (or, where the
    backend can, together with) the rows held back by :func:`defer_write`; note the
    transaction's name from the same round trip when it is not known yet.

    Synchronous, on the session of an ``AsyncSession`` (``await session.run_sync(...)``):
    callers write everything a step has in one trip into the session's greenlet, not one per
    statement and one more for the connection (each costs about as much CPU as a small
    statement).

    Returns:
        The ``returning`` columns of each row, in the order of ``rows`` (empty without).
    """
    connection = session.connection()
    steps = _take_pending(session)
    if not returning:
        steps.append((statement, list(rows)))
        _send(session, connection, steps)
        return ()
    _send(session, connection, steps)
    return _write(session, connection, statement, rows, returning)


def defer_write(session: Session, statement: WriteStatement, rows: list[dict[str, Any]]) -> None:
    """Hold ``rows`` back: they go with the transaction's next qx write, or with COMMIT
    (:func:`send_pending`), in the order they were given. Nothing reads them before: the
    caller writes rows that nothing of the transaction reads back before COMMIT."""
    record = existing_transaction(session)
    if record is None:  # not a qx session: nobody would send them later
        execute_write(session, statement, rows)
    elif rows:
        record.pending.append((statement, rows))


def send_pending(session: Session) -> None:
    """Send the rows :func:`defer_write` held back (before COMMIT, or a statement that
    may read them)."""
    steps = _take_pending(session)
    if steps:
        _send(session, session.connection(), steps)


def send_alone(
    session: Session,
    name: Callable[[Connection, Column[Any], Any], Any],
    taken: list[Any],
) -> bool:
    """Send the rows held back as a transaction of their own: one statement, without BEGIN
    and COMMIT (PostgreSQL: one round trip where a transaction takes three), when they are
    everything the transaction writes - nothing was sent in it yet, nothing else is to be
    flushed, they go as one statement, and one of them has a key made for it
    (``WriteStatement.fresh_key``) - and the backend can. ``name(connection, column,
    value)`` gives the handle a probe asks about if the answer is lost, by that row
    (``None``: not this way); it is kept in ``taken`` before anything is sent.

    Returns:
        Whether they were sent (and committed); if not, nothing was sent.
    """
    record = existing_transaction(session)
    if (
        record is None
        or record.connected
        or not record.pending
        or session.identity_map  # loaded objects (the deleted are among them)
        or session.new
    ):
        return False
    steps = [step for step in record.pending if step[1]]
    witness = next(
        (
            (owner.statement.table.c[owner.fresh_key], rows[0][owner.fresh_key])
            for owner, rows in steps
            if owner.fresh_key is not None and owner.fresh_key in rows[0]
        ),
        None,
    )
    if witness is None:
        return False
    connection = session.connection()
    dialect = dialect_of(connection)
    alone = dialect.alone(connection)
    if alone is None:
        return False
    # One statement: one row, or the steps combined (not named: the statement is the
    # transaction, asked about by its row).
    form = None
    if len(steps) == 1:
        if len(steps[0][1]) != 1:
            return False
    else:
        form = _combined_form(connection, steps, None) if dialect.combines_inserts else None
        if form is None:
            return False
    handle = name(connection, witness[0], witness[1])
    if handle is None:
        return False
    taken.append(handle)
    record.pending = []
    with alone:
        if form is None:
            _write(session, connection, steps[0][0], steps[0][1], (), named=False)
        else:
            _send_combined(session, connection, steps, form, None)
    return True


def held_rows(session: Session) -> list[tuple[WriteStatement, list[dict[str, Any]]]]:
    """The rows held back, by statement, in order (not sent yet)."""
    record = existing_transaction(session)
    return [] if record is None else list(record.pending)


def _take_pending(session: Session) -> list[tuple[WriteStatement, list[dict[str, Any]]]]:
    # Taken before they are sent: a failed send is not sent again by the next statement.
    record = existing_transaction(session)
    if record is None or not record.pending:
        return []
    steps, record.pending = record.pending, []
    return steps


def _send(
    session: Session,
    connection: Connection,
    steps: list[tuple[WriteStatement, list[Any]]],
) -> None:
    """Write ``steps`` in order, as one statement where the backend can (bringing the
    transaction's name back, if not known yet)."""
    steps = [step for step in steps if step[1]]
    if len(steps) > 1 and dialect_of(connection).combines_inserts:
        column = _name_column(session, connection)
        form = _combined_form(connection, steps, column)
        if form is not None:
            _send_combined(session, connection, steps, form, column)
            return
    for statement, rows in steps:
        _write(session, connection, statement, rows, ())


def _send_combined(
    session: Session,
    connection: Connection,
    steps: list[tuple[WriteStatement, list[Any]]],
    form: _Compiled,
    column: ColumnElement[str] | None,
) -> None:
    fetched, _ = _cursor_run(
        connection,
        form.sql,
        _sequence(connection.dialect, form.values(steps)),
        many=False,
        fetch=column is not None,
        converts=form.results,
    )
    if column is not None and fetched:
        _note_name(session, fetched[0][0])


def _write(
    session: Session,
    connection: Connection,
    statement: WriteStatement,
    rows: Sequence[dict[str, Any]],
    returning: Sequence[ColumnElement[Any]],
    *,
    named: bool = True,
) -> Sequence[Any]:
    column = _name_column(session, connection) if named else None
    wanted = (*returning, column) if column is not None else tuple(returning)
    if not wanted:
        _run(connection, statement, statement.statement, rows, fetch=False)
        return ()
    ordered = bool(returning) and len(rows) > 1  # keys must match their rows
    variant = statement.returning(wanted, ordered=ordered)
    fetched, _ = _run(connection, statement, variant, rows, fetch=True)
    if column is not None and fetched:
        _note_name(session, fetched[0][-1])
    return fetched


def execute_update(
    session: Session, statement: WriteStatement, rows: Sequence[dict[str, Any]]
) -> int:
    """Execute the UPDATE ``statement`` with ``rows`` (one row when the transaction's name
    is still to come back: see :func:`names_transaction`) on the session's connection,
    after the rows held back by :func:`defer_write`.

    Returns:
        How many rows matched its WHERE clause, in all (``-1``: the driver cannot tell for
        several rows).
    """
    send_pending(session)
    connection = session.connection()
    column = _name_column(session, connection) if len(rows) == 1 else None
    if column is None:
        return _run(connection, statement, statement.statement, rows, fetch=False)[1]
    variant = statement.returning((column,), ordered=False)
    fetched, _ = _run(connection, statement, variant, rows, fetch=True)
    if fetched:
        _note_name(session, fetched[0][-1])
    return len(fetched)


def names_transaction(session: Session) -> bool:
    """Whether the session's next qx write is to bring its transaction's name back."""
    return _name_column(session, session.connection()) is not None


def _name_column(session: Session, connection: Any) -> ColumnElement[str] | None:
    """The column a write returns to name its transaction (``None``: the backend cannot,
    the name is known already, or the session keeps no record to note it in)."""
    record = existing_transaction(session)
    if record is None or record.transaction_id is not None:
        return None
    return dialect_of(connection).transaction_id


def _note_name(session: Session, name: str) -> None:
    record = existing_transaction(session)
    assert record is not None  # _name_column found it
    record.transaction_id = name


def own_columns(mapper: Mapper[Any]) -> list[tuple[str, Column[Any]]] | None:
    """``(attribute key, column)`` of each column of a mapper whose rows qx can write with
    its own statements: one plain table (no inheritance), one column per attribute, none
    the database computes; ``None`` for any other mapper (the flush writes its rows)."""
    table = mapper.local_table
    if (
        not isinstance(table, Table)
        or mapper.inherits is not None
        or mapper.polymorphic_on is not None
        or len(mapper.tables) != 1
    ):
        return None
    columns: list[tuple[str, Column[Any]]] = []
    for prop in mapper.column_attrs:
        if len(prop.columns) != 1 or prop.columns[0].table is not table:
            return None
        column = prop.columns[0]
        if not isinstance(column, Column) or column.computed is not None:
            return None
        if column.identity is not None:
            return None
        columns.append((prop.key, column))
    return columns


class _Compiled(NamedTuple):
    """A write compiled for one backend and one set of row keys: what :func:`_run` sends."""

    sql: str
    #: the driver's parameters, in order, from a row (in a combined write, from the steps):
    #: each a value of it converted as its column's type does for the driver, or a constant
    #: bound in the statement (converted once, at compile time)
    values: Callable[[Any], tuple[Any, ...]]
    #: per returned column, the conversion of its value (or ``None``)
    results: tuple[Callable[[Any], Any] | None, ...]


_NOT_COMPILED: Final = object()


def _run(
    connection: Connection,
    owner: WriteStatement,
    statement: Insert | Update,
    rows: Sequence[dict[str, Any]],
    *,
    fetch: bool,
) -> tuple[Sequence[Sequence[Any]], int]:
    """Execute ``statement`` (``owner``'s or one of its variants) with ``rows``: the rows
    it returned (if ``fetch``) and how many rows it matched. No rows: nothing is sent (an
    INSERT with no parameters would write one row of defaults)."""
    if not rows:
        return (), 0
    dialect = connection.dialect
    many = len(rows) > 1
    form = None
    # A schema translation map is applied per execution: the Connection's job.
    if not connection.get_execution_options().get("schema_translate_map"):
        keys = tuple(sorted(rows[0]))
        forms = owner._forms.get(dialect)
        if forms is None:
            forms = owner._forms[dialect] = {}
        key = (id(statement), keys, many)
        form = forms.get(key, _NOT_COMPILED)
        if form is _NOT_COMPILED:
            form = forms[key] = _compile(dialect, statement, keys, many=many)
    if form is None:
        result = connection.execute(statement, rows)
        return (result.all() if fetch else ()), result.rowcount
    assert isinstance(form, _Compiled)
    values = form.values
    params = [_sequence(dialect, values(row)) for row in rows]
    return _cursor_run(
        connection,
        form.sql,
        params if many else params[0],
        many=many,
        fetch=fetch,
        converts=form.results,
    )


def _sequence(dialect: SADialect, values: tuple[Any, ...]) -> Any:
    sequence = dialect.execute_sequence_format
    return values if sequence is tuple else sequence(values)


def _cursor_run(
    connection: Connection,
    sql: str,
    params: Any,
    *,
    many: bool,
    fetch: bool,
    converts: tuple[Callable[[Any], Any] | None, ...],
) -> tuple[Sequence[Sequence[Any]], int]:
    cursor = connection.connection.cursor()
    try:
        _execute(connection, cursor, sql, params, many=many)
        matched = int(cursor.rowcount)
        if not fetch:
            return (), matched
        found = cursor.fetchall()
    finally:
        cursor.close()
    if not any(converts):
        return found, matched
    return [
        tuple(
            value if convert is None else convert(value)
            for value, convert in zip(row, converts, strict=True)
        )
        for row in found
    ], matched


def _execute(connection: Connection, cursor: Any, sql: str, params: Any, *, many: bool) -> None:
    """What ``Connection`` does around a cursor's execute: cursor events, echo, the
    dialect's ``do_execute`` hooks (the testing kit's memory backend), error translation
    (and invalidating a connection that died)."""
    dialect = connection.dialect
    try:
        events = connection._has_events or connection.engine._has_events
        if events:
            for before in connection.dispatch.before_cursor_execute:
                sql, params = before(connection, cursor, sql, params, None, many)
        if connection._echo:
            connection._log_info(sql)
            if connection.engine.hide_parameters:
                connection._log_info("[qx] [SQL parameters hidden due to hide_parameters=True]")
            else:
                connection._log_info("[qx] %r", _repr_params(params, batches=10, ismulti=many))
        hooks = (
            ()
            if not dialect._has_events
            else dialect.dispatch.do_executemany
            if many
            else dialect.dispatch.do_execute
        )
        for hook in hooks:
            if hook(cursor, sql, params, None):
                break
        else:
            if many:
                dialect.do_executemany(cursor, sql, params, None)
            else:
                dialect.do_execute(cursor, sql, params, None)
        if events:
            connection.dispatch.after_cursor_execute(connection, cursor, sql, params, None, many)
    except BaseException as exc:
        connection._handle_dbapi_exception(exc, sql, params, cursor, None)


def _compile(
    dialect: SADialect, statement: Insert | Update, keys: tuple[str, ...], *, many: bool
) -> _Compiled | None:
    """``statement`` compiled for rows with ``keys``; ``None`` when executing it takes more
    than its parameters (then the Connection executes it)."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=many)
    assert isinstance(compiled, SQLCompiler)
    if many and compiled.effective_returning:
        return None
    return _compiled(dialect, compiled, {key: (key,) for key in keys})


def _compiled(
    dialect: SADialect, compiled: SQLCompiler, sources: dict[str, tuple[Any, ...]]
) -> _Compiled | None:
    """What :func:`_run` needs of ``compiled``: each parameter taken from the row by the
    subscripts its ``sources`` entry gives (by bind name), or bound in the statement;
    ``None`` when it needs more than its parameters."""
    if (
        not compiled.positional
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
    ):
        return None
    processors = compiled._bind_processors
    # The parameters are built by one generated function (a tuple display of subscripts),
    # as SQLAlchemy builds its constructors: a loop over the parameters, per row, cost
    # several times as much (a tenth of the client's time placing an order).
    terms: list[str] = []
    given: dict[str, Any] = {}
    assert compiled.positiontup is not None  # positional
    for index, name in enumerate(compiled.positiontup):
        bind = compiled.binds[name]
        # A positional statement without expanding IN has one processor per parameter.
        convert = cast("Callable[[Any], Any] | None", processors.get(name))
        source = sources.get(bind.key)
        if source is not None:
            term = "row" + "".join(f"[{part!r}]" for part in source)
            if convert is not None:
                given[f"c{index}"] = convert
                term = f"c{index}({term})"
            terms.append(term)
        elif bind.callable is None and not bind.required:
            # Bound in the statement: the same driver value on every execution.
            value = bind.effective_value
            given[f"k{index}"] = value if convert is None else convert(value)
            terms.append(f"k{index}")
        else:
            return None  # a value from elsewhere: the Connection knows where
    # Only literals of the subscripts' own (repr of str and int) and names bound above.
    values = eval(f"lambda row: ({''.join(term + ', ' for term in terms)})", given)
    results = tuple(
        column.type._cached_result_processor(dialect, None) for column in compiled._result_columns
    )
    return _Compiled(compiled.string, values, results)


def _combined_form(
    connection: Connection,
    steps: list[tuple[WriteStatement, list[dict[str, Any]]]],
    column: ColumnElement[str] | None,
) -> _Compiled | None:
    """The one statement writing ``steps`` (and returning the transaction's name when
    ``column``), compiled once per shape of the steps; ``None`` when they do not combine."""
    if (
        any(len(rows) > COMBINED_ROWS for _, rows in steps)
        or sum(len(rows) * len(rows[0]) for _, rows in steps) > COMBINED_PARAMETERS
        or connection.get_execution_options().get("schema_translate_map")
    ):
        return None
    shape = (
        "combined",
        column is not None,
        tuple((id(owner), tuple(sorted(rows[0])), len(rows)) for owner, rows in steps),
    )
    forms = steps[0][0]._forms.get(connection.dialect)
    if forms is None:
        forms = steps[0][0]._forms[connection.dialect] = {}
    found = forms.get(shape)
    if found is None:
        # The statements are kept with the form: their ids in the shape stay theirs.
        form = _compile_combined(connection.dialect, steps, column)
        found = forms[shape] = (form, tuple(owner for owner, _ in steps))
    combined: _Compiled | None = found[0]
    return combined


def _compile_combined(
    dialect: SADialect,
    steps: list[tuple[WriteStatement, list[dict[str, Any]]]],
    column: ColumnElement[str] | None,
) -> _Compiled | None:
    """``WITH w0 AS (INSERT ... VALUES (...), (...)), w1 AS (...) SELECT <column>``, each
    parameter taken from ``(step, row, key)``."""
    sources: dict[str, tuple[Any, ...]] = {}
    parts = []
    try:
        for index, (owner, rows) in enumerate(steps):
            statement = owner.statement
            if not isinstance(statement, Insert):
                return None
            keys = sorted(rows[0])
            values = []
            for number in range(len(rows)):
                row = {}
                for key in keys:
                    name = f"qx_{index}_{number}_{len(sources)}"
                    sources[name] = (index, 1, number, key)  # steps[index] = (owner, rows)
                    row[key] = bindparam(name, type_=statement.table.c[key].type)
                values.append(row)
            parts.append(statement.values(values).cte(f"qx_w{index}"))
        head = literal_column("1") if column is None else column
        compiled = select(head).add_cte(*parts).compile(dialect=dialect)
    except (SQLAlchemyError, KeyError):
        return None  # a statement with VALUES of its own, a key that is not a column
    assert isinstance(compiled, SQLCompiler)
    return _compiled(dialect, compiled, sources)
