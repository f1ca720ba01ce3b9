"""The query API: ``Q`` conditions, the immutable ``QuerySet``, keyset cursors and ``Page``."""

from qx.db.query._cursor import CursorCodec
from qx.db.query._page import Page
from qx.db.query._q import Q
from qx.db.query._queryset import QuerySet

__all__ = ["CursorCodec", "Page", "Q", "QuerySet"]
