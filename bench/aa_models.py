"""advanced-alchemy's side of the benchmarks: declarative models on tables of their own and
its ``SQLAlchemyAsyncRepository``, used the way its documentation shows.

(No ``from __future__ import annotations`` here: declarative ``Mapped[...]`` annotations are
resolved at class creation.)
"""

from datetime import datetime
from decimal import Decimal
from uuid import UUID

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from common import TENANT
from sqlalchemy import ForeignKey, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from qx.core import new_id, utcnow
from qx.db.types import UtcDateTime


class Base(DeclarativeBase):
    pass


class AALine(Base):
    __tablename__ = "aa_order_lines"
    id: Mapped[UUID] = mapped_column(primary_key=True, default=new_id)
    order_id: Mapped[UUID] = mapped_column(ForeignKey("aa_orders.id"), index=True)
    sku: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[int]
    unit_price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    tenant_id: Mapped[str] = mapped_column(String(64), default=TENANT)


class AAOrder(Base):
    __tablename__ = "aa_orders"
    id: Mapped[UUID] = mapped_column(primary_key=True, default=new_id)
    customer: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="placed")
    version: Mapped[int] = mapped_column(default=1)
    tenant_id: Mapped[str] = mapped_column(String(64), default=TENANT)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    lines: Mapped[list[AALine]] = relationship(cascade="all, delete-orphan", lazy="selectin")
    __mapper_args__ = {"version_id_col": version}


class AAOrderRepository(SQLAlchemyAsyncRepository[AAOrder]):
    model_type = AAOrder


metadata = Base.metadata
