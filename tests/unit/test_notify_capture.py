"""The reason a --notify URL failed comes from Apprise's log, which is shared by the start's
thread and the end's: a warning another thread logs about another URL (with that URL's
secrets) must not become this URL's reason (commands/notify.py)."""

from __future__ import annotations

import threading

from immich_stream.commands.notify import _ReasonCapture
from immich_stream.config.notify import quiet_apprise


def test_a_url_takes_its_reason_only_from_its_own_thread() -> None:
    logger = quiet_apprise()
    capture = _ReasonCapture("json://host/token-one")
    logger.addHandler(capture)
    try:
        other = threading.Thread(target=lambda: logger.warning("failed to send to json://host/token-two-secret"))
        other.start()
        other.join()
        assert capture.last == ""  # before: the other URL's secret, told as this URL's reason
        logger.warning("Failed to send to json://host/token-one: 500")
        assert capture.last == "Failed to send to ***: 500"  # its own reason, its URL taken out
    finally:
        logger.removeHandler(capture)
