"""Range checks of user-given numbers: values accepted as ints, a wrong one is one line naming key, value and range."""
import pytest

from omniquant import checks
from omniquant.errors import UserError
from omniquant.quantizer import FULL_PRECISION_BITS


def test_valid_values_come_back_as_ints():
    assert [checks.bits(b) for b in (2, "8", 16)] == [2, 8, 16]
    assert checks.positive_int("128") == 128 and checks.seqlen(2) == 2


@pytest.mark.parametrize("check, value, message", [
    (checks.bits, 1, "--wbits=1 is invalid: allowed 2..8, or 16 for full precision"),
    (checks.bits, "9", "--wbits=9 is invalid: allowed 2..8, or 16 for full precision"),
    (checks.bits, "four", "--wbits=four is invalid"),
    (checks.bits, True, "--wbits=True is invalid"),
    (checks.positive_int, 0, "--wbits=0 is invalid: allowed an integer >= 1"),
    (checks.positive_int, "-3", "--wbits=-3 is invalid: allowed an integer >= 1"),
    (checks.positive_int, 2.5, "--wbits=2.5 is invalid: allowed an integer >= 1"),
    (checks.seqlen, 1, "--wbits=1 is invalid: allowed an integer >= 2"),
])
def test_wrong_values_are_one_line_user_errors(check, value, message):
    with pytest.raises(UserError) as err:
        check(value, "--wbits")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_full_precision_is_the_quantizers():
    assert checks.FULL_PRECISION_BITS == FULL_PRECISION_BITS
