"""Shared fixtures: the tiny model is built once per cache and loaded fresh per test,

because attaching adapters changes a model in place. Imports stay inside the fixtures so
test files that need no model do not pay for importing torch."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_path():
    from fedpal.common.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture
def tiny_base(tiny_path):
    from fedpal.common.models import load_base_model

    return load_base_model("tiny", device="cpu")
