import pytest
from hypothesis import given
from hypothesis import strategies as st

from opentrack.tokens import EMAIL_ID_PATTERN, TokenSigner

ids = st.from_regex(EMAIL_ID_PATTERN, fullmatch=True)


@given(ids)
def test_round_trip(email_id: str) -> None:
    signer = TokenSigner("s3cret")
    assert signer.verify(signer.sign(email_id)) == email_id


@given(st.text(max_size=400))
def test_arbitrary_text_never_verifies_or_raises(token: str) -> None:
    assert TokenSigner("s3cret").verify(token) is None


def test_other_secret_does_not_verify() -> None:
    token = TokenSigner("one").sign("e-1")
    assert TokenSigner("two").verify(token) is None


def test_tampered_email_id_or_mac_is_rejected() -> None:
    signer = TokenSigner("s3cret")
    kid, encoded, mac = signer.sign("e-1").split(".")
    forged_id = signer.sign("e-2").split(".")[1]
    assert signer.verify(f"{kid}.{forged_id}.{mac}") is None
    assert signer.verify(f"{kid}.{encoded}.{mac[:-2]}AA") is None
    assert signer.verify(f"{kid}.{encoded}") is None
    assert signer.verify(f"{kid}.{encoded}.{mac}.x") is None


def test_rotation_keeps_old_tokens_while_listed() -> None:
    old = TokenSigner("old").sign("e-1")
    assert TokenSigner("new", previous=["old"]).verify(old) == "e-1"
    assert TokenSigner("new").verify(old) is None
    new = TokenSigner("new", previous=["old"]).sign("e-1")
    assert TokenSigner("new").verify(new) == "e-1"


def test_token_is_short_and_url_safe() -> None:
    token = TokenSigner("s3cret").sign("email-0001")
    assert len(token) < 60
    assert all(c.isalnum() or c in "-_." for c in token)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é", "a/b"])
def test_sign_refuses_ids_outside_the_pattern(bad: str) -> None:
    with pytest.raises(ValueError):
        TokenSigner("s").sign(bad)
