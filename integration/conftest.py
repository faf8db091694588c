"""Fixtures shared by the integration tests (they live in qmpnet.testing.fixtures)."""

from qmpnet.testing.fixtures import *  # noqa: F403
