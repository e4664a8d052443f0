"""Apprise, the optional `notify` extra, as the settings see it: whether it is installed
and which --notify URLs it cannot send to. Apprise's own log is silenced here and
wherever it is used: its messages may quote a URL, and every URL is a credential.
"""

from __future__ import annotations

import logging
from typing import Any


def quiet_apprise() -> logging.Logger:
    """Apprise's logger, cut off from ours and from Python's last-resort stderr handler."""
    logger = logging.getLogger("apprise")
    logger.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return logger


def load_apprise() -> Any | None:
    """The apprise module, or None when the `notify` extra is not installed."""
    quiet_apprise()
    try:
        import apprise
    except ImportError:
        return None
    return apprise


def unknown_apprise_urls(urls: tuple[str, ...]) -> list[tuple[int, str]] | None:
    """(position from 1, scheme) of each URL Apprise does not know or cannot parse; None when
    Apprise is not installed."""
    apprise = load_apprise()
    if apprise is None:
        return None
    return [
        (n, url.split(":", 1)[0])
        for n, url in enumerate(urls, 1)
        if apprise.Apprise.instantiate(url, suppress_exceptions=True) is None
    ]
