"""The query API: ``Q``, lookups, the immutable ``Query``, keyset cursors and ``Page``."""

from qx.db.query._coerce import coerce_value
from qx.db.query._compiler import evaluate
from qx.db.query._cursor import CursorCodec
from qx.db.query._fields import column_attribute
from qx.db.query._keyset import parse_sort
from qx.db.query._lookups import LOOKUPS
from qx.db.query._page import Page
from qx.db.query._q import Q
from qx.db.query._queryset import Query

__all__ = [
    "LOOKUPS",
    "CursorCodec",
    "Page",
    "Q",
    "Query",
    "coerce_value",
    "column_attribute",
    "evaluate",
    "parse_sort",
]
