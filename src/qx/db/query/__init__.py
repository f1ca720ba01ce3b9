"""The query API: ``Q``, lookups, the immutable ``Query``, keyset cursors and ``Page``."""

from qx.db.query.coerce import coerce_value
from qx.db.query.compiler import evaluate
from qx.db.query.cursor import CursorCodec
from qx.db.query.fields import column_attribute
from qx.db.query.keyset import parse_sort
from qx.db.query.lookups import LOOKUPS
from qx.db.query.page import Page
from qx.db.query.q import Q
from qx.db.query.query import Query

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
