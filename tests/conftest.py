from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import stop_containers


@pytest.fixture(scope="session", autouse=True)
def _stop_test_containers() -> Iterator[None]:
    yield
    stop_containers()
