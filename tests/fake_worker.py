"""A worker connection for tests that build the controller's state by hand: the controller writes to it, and it
keeps what was sent, decoded."""

from __future__ import annotations

from controller import messages as m


class Wire:
    """A worker connection: what the controller sent it, decoded."""

    def __init__(self) -> None:
        self.sent: list[m.Message] = []

    def is_closing(self) -> bool:
        return False

    def write(self, frame: bytes) -> None:
        self.sent.append(m.decode(frame[4:]))

    def close(self) -> None:
        pass
