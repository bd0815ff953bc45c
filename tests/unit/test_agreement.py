"""LocalAgreement-2: deltas are append-only and only carry words two hypotheses agree on."""

from __future__ import annotations

from agent.agreement import LocalAgreement


def test_commits_only_what_two_hypotheses_agree_on() -> None:
    la = LocalAgreement()
    assert la.update("Ever") == ""  # nothing to agree with yet
    assert la.update("Ever tried") == "Ever"
    assert la.update("Ever tried, ever") == " tried,"
    assert la.update("Ever tried, ever failed") == " ever"
    assert la.text == "Ever tried, ever"


def test_case_and_punctuation_do_not_break_agreement() -> None:
    la = LocalAgreement()
    la.update("ever tried.")
    assert la.update("Ever tried, no") == "Ever tried,"


def test_rewritten_tail_is_not_committed() -> None:
    la = LocalAgreement()
    la.update("I scream")
    assert la.update("Ice cream") == ""
    assert la.update("Ice cream please") == "Ice cream"


def test_committed_words_are_never_retracted() -> None:
    la = LocalAgreement()
    la.update("fail again")
    la.update("fail again")
    assert la.text == "fail again"
    # Later hypotheses that disagree with committed words produce nothing.
    assert la.update("sail again better") == ""
    assert la.update("sail again better") == ""
    assert la.text == "fail again"


def test_finish_sends_the_rest_of_a_consistent_final() -> None:
    la = LocalAgreement()
    la.update("No matter")
    la.update("No matter try")
    assert la.finish("No matter. Try again.") == " Try again."
    assert la.text == "No matter Try again."


def test_finish_sends_nothing_when_final_contradicts() -> None:
    la = LocalAgreement()
    la.update("fail better")
    la.update("fail better")
    assert la.finish("Sail better.") == ""


def test_deltas_concatenate_to_committed_text() -> None:
    la = LocalAgreement()
    out = ""
    hyps = ["Try", "Try again", "Try again fail", "Try again, fail again", "Try again, fail again."]
    for hyp in hyps:
        out += la.update(hyp)
    out += la.finish("Try again, fail again.")
    # Same words as the final; punctuation is the one seen when each word was committed.
    assert out == "Try again fail again."
