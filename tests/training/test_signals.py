import os
import signal

from megatron_moe.training.signals import StopRequest


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
