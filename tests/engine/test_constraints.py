"""`Constraint` on a byte vocabulary: the tokens a grammar forces, and a matcher in error."""

from __future__ import annotations

import pytest

from gemserve.engine.constraints import Constraint, ConstraintError
from tests.service.scripted import grammar_tokenizer


def test_forced_tokens_are_what_the_grammar_leaves_no_choice_about() -> None:
    constraint = Constraint(grammar_tokenizer(), 'start: "get_weather_" ("forecast" | "report")')
    assert bytes(constraint.forced()) == b"get_weather_"
    for token in b"get_weather_":
        constraint.consume(token)
    assert constraint.forced() == []  # forecast or report: the model chooses
    constraint.consume(ord("r"))
    assert bytes(constraint.forced()) == b"eport"
    for token in b"eport":
        constraint.consume(token)
    assert constraint.finished


def test_asking_what_is_forced_changes_nothing_the_constraint_allows() -> None:
    grammar = 'start: "{\\"name\\": \\"" ("alpha" | "beta") "\\"}"'
    asking, silent = Constraint(grammar_tokenizer(), grammar), Constraint(grammar_tokenizer(), grammar)
    for token in b'{"name": "beta"}':
        asking.forced()
        assert (asking.allowed(256) == silent.allowed(256)).all()
        asking.consume(token)
        silent.consume(token)
    assert asking.finished and silent.finished


def test_a_matcher_in_error_forces_nothing_and_fails_where_the_sequence_is_advanced() -> None:
    constraint = Constraint(grammar_tokenizer(), 'start: "abc"')
    with pytest.raises(ConstraintError):
        constraint.consume(ord("x"))
    assert constraint.forced() == []
    with pytest.raises(ConstraintError):
        constraint.allowed(256)
