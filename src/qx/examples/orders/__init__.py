"""The orders bounded context: a complete, small example of qx in use.

* :mod:`.domain` — plain dataclasses and events; no qx.db, no SQLAlchemy.
* :mod:`.infrastructure` — tables, imperative mapping, repositories, unit of work.
* :mod:`.handlers` — in-process domain event handlers.
"""
