"""Resolving a field name to a mapped column attribute."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import ColumnProperty, InstrumentedAttribute, Mapper

from qx.core._errors import InvalidQuery, shown

__all__ = ["column_attribute"]


def column_attribute(mapper: Mapper[Any], name: str, *, owner: str) -> InstrumentedAttribute[Any]:
    """Return the mapped column attribute ``name`` of ``mapper``.

    Raises:
        InvalidQuery: ``name`` is not a mapped column of the entity.
    """
    prop = mapper.attrs.get(name) if isinstance(name, str) else None
    if not isinstance(prop, ColumnProperty):
        raise InvalidQuery(f"{owner} has no column field {shown(name)}", field=str(name))
    attr: InstrumentedAttribute[Any] = getattr(mapper.class_, name)
    return attr
