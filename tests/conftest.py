"""Messages created outside Flower's runtime need the identity of a running task; the tests that
build Messages by hand get the same fixed server identity as the inline engine."""

import pytest


@pytest.fixture(autouse=True)
def _flower_task_identity():
    from simulator.engine.inline import set_server_identity

    set_server_identity()
