"""Query building: field resolution, value coercion, ordering."""

from qx.db.query.coerce import coerce_value
from qx.db.query.fields import column_attribute, equality_criteria, order_by_clauses, parse_sort

__all__ = [
    "coerce_value",
    "column_attribute",
    "equality_criteria",
    "order_by_clauses",
    "parse_sort",
]
