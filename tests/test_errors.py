"""Entry points report user errors and interrupts in one line with the conventional exit codes."""
import signal

import pytest

from omniquant.errors import Interrupted, UserError, exit_code, exit_on_user_error


def _raising(err: BaseException):
    def entry() -> None:
        raise err
    return entry


@pytest.mark.parametrize("err, code, line", [
    (UserError("bad flag"), 2, "omniquant: error: bad flag"),
    (KeyboardInterrupt(), 130, "omniquant: interrupted; run the same command to resume"),
    (Interrupted(signal.SIGTERM), 143, "omniquant: interrupted; run the same command to resume"),
    (Interrupted(signal.SIGINT, "block 3 of 30"), 130,
     "omniquant: interrupted at block 3 of 30; run the same command to resume"),
])
def test_one_line_and_the_exit_code(err, code, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(_raising(err))()
    assert exit_info.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_interrupt_hint_is_the_entry_points(capsys):
    with pytest.raises(SystemExit):
        exit_on_user_error(_raising(Interrupted(signal.SIGTERM)), "run the same command again")()
    assert capsys.readouterr().err == "omniquant: interrupted; run the same command again\n"


def test_interrupted_is_a_keyboard_interrupt_named_after_its_signal():
    err = Interrupted(signal.SIGTERM)
    assert isinstance(err, KeyboardInterrupt) and str(err) == "signal SIGTERM" and err.where == ""
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130
