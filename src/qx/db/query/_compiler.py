"""Turning ``Q`` trees and ``field__lookup`` keys into SQL.

Paths walk relationships with ``__``: a many-to-one step at the top of a query becomes a
``LEFT OUTER JOIN`` to an alias (one per path, reused by every condition on that path), so the
root rows are never duplicated; a one-to-many or many-to-many step becomes a correlated
``EXISTS`` (``relationship.any()``), also never duplicating roots. Conditions on the same
to-many path inside one AND node share one ``EXISTS``, so they must hold for the same related
row, as in Django.

Every key is checked before SQL is built: the field (path without lookup) must be in the
repository's allow-list, exist in the mapping, and end at a column; the lookup must exist; the
value must fit the column. Anything else is ``InvalidQuery`` naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import and_, or_, true
from sqlalchemy.orm import ColumnProperty, Mapper, RelationshipProperty, aliased
from sqlalchemy.orm.interfaces import ONETOMANY
from sqlalchemy.sql.elements import ColumnElement

from qx.core._errors import InvalidQuery, shown
from qx.db.query._lookups import LOOKUPS, Lookup
from qx.db.query._q import Q

__all__ = [
    "Checked",
    "Condition",
    "FieldPath",
    "FilterCompiler",
    "RelatedRows",
    "Step",
    "check",
    "resolve_key",
]


@dataclass(frozen=True, slots=True)
class Step:
    """One relationship hop of a path."""

    key: str
    to_many: bool
    target: Mapper[Any]


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A resolved ``a__b__column`` path.

    Attributes:
        name: the path as written (``"lines__sku"``), what allow-lists name.
        steps: the relationship hops.
        column_key: the attribute of the column at the end.
        nullable: whether the column itself is nullable.
    """

    name: str
    steps: tuple[Step, ...]
    column_key: str
    nullable: bool

    @property
    def parts(self) -> tuple[str, ...]:
        """The path split on ``__``."""
        return tuple(self.name.split("__"))


@dataclass(frozen=True, slots=True)
class Condition:
    """A checked leaf: a field path, a lookup and the coerced value.

    Attributes:
        param: the name of the bound parameter carrying the value (unique in its query).
        type_: the column's type, which the parameter is bound with.
    """

    field: FieldPath
    lookup: Lookup
    value: Any
    key: str
    param: str
    type_: Any


@dataclass(frozen=True, slots=True)
class RelatedRows:
    """A checked ``rel__isnull`` leaf: the relationship hops and whether rows must be absent."""

    steps: tuple[RelationshipProperty[Any], ...]
    absent: bool


@dataclass(frozen=True, slots=True)
class Checked:
    """A ``Q`` tree whose every leaf is checked; SQL is built from it later, as often as
    needed, by :meth:`FilterCompiler.build`.

    Attributes:
        shape: what the SQL depends on (keys, lookups, connectors, ``None`` values, flags),
            ``None`` when a value must be built into the SQL itself; equal shapes build
            the same statement, whatever the values.
        params: the bound parameters carrying the values, by name.
        size: the leaves, which numbered the parameters.
        local: every leaf is on the root's own columns (no join, no subquery).
    """

    connector: str
    negated: bool
    children: tuple[Checked | Condition | RelatedRows, ...]
    shape: object
    params: tuple[tuple[str, Any], ...]
    size: int
    local: bool


def _relationship_step(prop: RelationshipProperty[Any]) -> Step:
    to_many = prop.uselist or prop.direction is ONETOMANY or prop.secondary is not None
    return Step(prop.key, bool(to_many), prop.mapper)


@lru_cache(maxsize=4096)
def _resolve_path(mapper: Mapper[Any], parts: tuple[str, ...], owner: str) -> FieldPath:
    steps: list[Step] = []
    current = mapper
    for index, part in enumerate(parts):
        prop = current.attrs.get(part)
        last = index == len(parts) - 1
        if isinstance(prop, RelationshipProperty):
            if last:
                example = "__".join((*parts, "id"))
                raise InvalidQuery(
                    f"{'__'.join(parts)!r} is a relationship of {owner}; filter on one of its "
                    f"fields (e.g. {shown(example)})",
                    field="__".join(parts),
                )
            step = _relationship_step(prop)
            steps.append(step)
            current = step.target
            continue
        if isinstance(prop, ColumnProperty) and last and len(prop.columns) == 1:
            column = prop.columns[0]
            return FieldPath(
                name="__".join(parts),
                steps=tuple(steps),
                column_key=prop.key,
                nullable=bool(getattr(column, "nullable", True)),
            )
        name = "__".join(parts)
        raise InvalidQuery(f"{owner} has no field {shown(name)}", field=name)
    raise InvalidQuery(f"{owner}: empty field name", field="")  # pragma: no cover - parts >= 1


def resolve_key(
    mapper: Mapper[Any], key: str, *, allowed: Iterable[str] | None, owner: str
) -> tuple[FieldPath, Lookup]:
    """Split ``field__lookup`` and resolve it against ``mapper`` and the allow-list.

    Args:
        allowed: field names accepted; ``None`` accepts every mapped field.

    Raises:
        InvalidQuery: unknown field or lookup, or a field outside ``allowed``.
    """
    if not isinstance(key, str) or not key or len(key) > 300:
        raise InvalidQuery(f"invalid filter key {shown(key)}", field=str(key)[:300])
    parts = tuple(key.split("__"))
    if any(not part for part in parts):
        raise InvalidQuery(f"invalid filter key {shown(key)}", field=key)
    lookup = LOOKUPS["exact"]
    if len(parts) > 1 and parts[-1] in LOOKUPS:
        lookup = LOOKUPS[parts[-1]]
        parts = parts[:-1]
    name = "__".join(parts)
    if allowed is not None and name not in allowed:
        # Checked before resolution so a caller learns nothing about fields they cannot use.
        listed = ", ".join(sorted(allowed)) or "none"
        if len(parts) > 1 and _looks_like_lookup(mapper, parts, owner):
            raise InvalidQuery(
                f"unknown lookup {shown(parts[-1])} in {shown(key)} "
                f"(lookups: {', '.join(sorted(LOOKUPS))})",
                field=key,
            )
        raise InvalidQuery(
            f"filter {shown(name)} is not allowed on {owner} (allowed: {listed})", field=name
        )
    return _resolve_path(mapper, parts, owner), lookup


def _looks_like_lookup(mapper: Mapper[Any], parts: tuple[str, ...], owner: str) -> bool:
    try:
        _resolve_path(mapper, parts[:-1], owner)
    except InvalidQuery:
        return False
    return True


def check(
    mapper: Mapper[Any],
    key: str,
    value: Any,
    *,
    allowed: Iterable[str] | None,
    owner: str,
    param: str,
) -> Condition:
    """Resolve ``key`` and coerce ``value``: a leaf ready for SQL, bound as ``param``."""
    field, lookup = resolve_key(mapper, key, allowed=allowed, owner=owner)
    target = mapper
    for step in field.steps:
        target = step.target
    column = target.attrs[field.column_key].columns[0]
    prepared = lookup.prepare(column, value, field.name)
    return Condition(field, lookup, prepared, key, param, column.type)


class FilterCompiler:
    """Checks ``Q`` trees for one root entity (:meth:`check`) and builds their SQL
    (:meth:`build`), collecting the joins they need.

    Checking happens where a filter is written, so a bad key or value fails there; the SQL is
    built when a statement needs it, with every value a named bound parameter, so a statement
    built once per shape serves later values as parameters.

    Args:
        mapper: the root mapper.
        allowed: the allow-list of field paths (``None``: every mapped field).
        owner: name used in error messages (the repository).
        dialect: ``"postgresql"``, ``"sqlite"``, ... (large ``in`` lists differ); only
            :meth:`build` uses it.
        joins: aliases already joined, by path (copied, never mutated).
    """

    def __init__(
        self,
        mapper: Mapper[Any],
        *,
        allowed: Iterable[str] | None,
        owner: str,
        dialect: str = "",
        joins: Mapping[tuple[str, ...], tuple[Any, Any, str]] | None = None,
    ) -> None:
        self.mapper = mapper
        self.allowed = None if allowed is None else frozenset(allowed)
        self.owner = owner
        self.dialect = dialect
        #: path -> (alias, parent entity or alias, relationship key), in join order.
        self.joins: dict[tuple[str, ...], tuple[Any, Any, str]] = dict(joins or {})

    def check(self, q: Q, first: int = 0) -> Checked:
        """Check every leaf of ``q``; its parameters are numbered from ``first``."""
        children: list[Checked | Condition | RelatedRows] = []
        shapes: list[object] = []
        params: list[tuple[str, Any]] = []
        index = first
        bound = True  # every value a parameter
        local = True
        for child in q.children:
            if isinstance(child, Q):
                checked = self.check(child, index)
                index += checked.size
                children.append(checked)
                shapes.append(checked.shape)
                params += checked.params
                bound = bound and checked.shape is not None
                local = local and checked.local
                continue
            key, value = child
            related = self._related_rows(key, value)
            if related is not None:
                children.append(related)
                shapes.append((key, related.absent))
                local = False
                continue
            name = f"qx_f{index}"
            index += 1
            leaf = check(
                self.mapper, key, value, allowed=self.allowed, owner=self.owner, param=name
            )
            binding = leaf.lookup.binding
            part = binding.shape(leaf.value)
            children.append(leaf)
            shapes.append((key, part))
            params += binding.params(name, leaf.value)
            bound = bound and part is not None
            local = local and not leaf.field.steps
        shape = (q.connector, q.negated, *shapes) if bound else None
        return Checked(
            q.connector, q.negated, tuple(children), shape, tuple(params), index - first, local
        )

    def build(self, checked: Checked) -> ColumnElement[bool]:
        """Return the two-valued SQL condition of ``checked`` on the root entity."""
        root = self.mapper.class_
        parts: list[ColumnElement[bool]] = []
        leaves: list[Condition] = []
        for child in checked.children:
            if isinstance(child, Checked):
                parts.append(self.build(child))
            elif isinstance(child, RelatedRows):
                parts.append(_exists(child))
            else:
                leaves.append(child)
        if checked.connector == Q.AND:
            parts[:0] = self._group(leaves, root, 0, joinable=True)
        else:
            parts[:0] = [self._group([c], root, 0, joinable=True)[0] for c in leaves]
        if not parts:
            combined: ColumnElement[bool] = true()
        elif len(parts) == 1:
            combined = parts[0]
        else:
            combined = and_(*parts) if checked.connector == Q.AND else or_(*parts)
        return ~combined if checked.negated else combined

    def _related_rows(self, key: Any, value: Any) -> RelatedRows | None:
        """``rel__isnull=True``: has no related row (``False``: has one), at any depth.

        ``None`` when ``key`` is not an ``isnull`` on a relationship path.
        """
        if not isinstance(key, str) or not key.endswith("__isnull"):
            return None
        parts = tuple(key.split("__")[:-1])
        steps: list[RelationshipProperty[Any]] = []
        current = self.mapper
        for part in parts:
            prop = current.attrs.get(part)
            if not isinstance(prop, RelationshipProperty):
                return None
            steps.append(prop)
            current = prop.mapper
        if not steps:
            return None
        name = "__".join(parts)
        if self.allowed is not None and not any(
            field == name or field.startswith(name + "__") for field in self.allowed
        ):
            listed = ", ".join(sorted(self.allowed)) or "none"
            raise InvalidQuery(
                f"filter {shown(name)} is not allowed on {self.owner} (allowed: {listed})",
                field=name,
            )
        absent = LOOKUPS["isnull"].prepare(true(), value, name)
        return RelatedRows(tuple(steps), bool(absent))

    def _advance(
        self, condition: Condition, base: Any, depth: int, joinable: bool
    ) -> tuple[Any, int]:
        steps = condition.field.steps
        while joinable and depth < len(steps) and not steps[depth].to_many:
            base = self._join(condition.field.parts[: depth + 1], base, steps[depth])
            depth += 1
        return base, depth

    def _join(self, path: tuple[str, ...], parent: Any, step: Step) -> Any:
        found = self.joins.get(path)
        if found is None:
            alias = aliased(step.target.class_, name="qx_" + "_".join(path))
            found = (alias, parent, step.key)
            self.joins[path] = found
        return found[0]

    def _group(
        self, conditions: list[Condition], base: Any, depth: int, *, joinable: bool
    ) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        groups: dict[tuple[str, ...], tuple[Any, int, list[Condition]]] = {}
        for condition in conditions:
            at, index = self._advance(condition, base, depth, joinable)
            steps = condition.field.steps
            if index == len(steps):
                column = getattr(at, condition.field.column_key)
                nullable = condition.field.nullable or index > depth  # outer-joined: may be NULL
                lookup = condition.lookup
                value = lookup.binding.placeholder(
                    condition.param, condition.value, condition.type_
                )
                out.append(lookup.build(column, value, nullable, self.dialect))
                continue
            path = condition.field.parts[: index + 1]
            groups.setdefault(path, (at, index, []))[2].append(condition)
        for at, index, members in groups.values():
            step = members[0].field.steps[index]
            inner = self._group(members, step.target.class_, index + 1, joinable=False)
            criterion = and_(*inner) if len(inner) > 1 else inner[0]
            relationship = getattr(at, step.key)
            out.append(relationship.any(criterion) if step.to_many else relationship.has(criterion))
        return out


def _exists(related: RelatedRows) -> ColumnElement[bool]:
    exists: Any = None
    for prop in reversed(related.steps):
        attr = getattr(prop.parent.class_, prop.key)
        test = attr.any if prop.uselist else attr.has
        exists = test() if exists is None else test(exists)
    condition: ColumnElement[bool] = ~exists if related.absent else exists
    return condition
