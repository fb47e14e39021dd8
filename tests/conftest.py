"""Shared fixtures: the tiny model is built once per cache and loaded fresh per test,

because attaching adapters changes a model in place."""

from __future__ import annotations

import pytest

from fedpal.common.models import BaseModel, load_base_model, resolve_model_path


@pytest.fixture(scope="session")
def tiny_path():
    return resolve_model_path("tiny")


@pytest.fixture
def tiny_base(tiny_path) -> BaseModel:
    return load_base_model("tiny", device="cpu")
