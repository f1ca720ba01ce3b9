"""ASGI entry point of the orders example: ``uvicorn examples.orders.main:app``.

Settings come from the environment (``QX_DB__URL``, ``QX_PAGINATION_SECRET``); migrate first
with ``qx db upgrade -c migrations``.
"""

from qx.examples.orders.api import create_app

app = create_app()
