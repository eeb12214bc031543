"""Protocol errors, split by whose fault they are (the h11 convention).

LocalProtocolError: this process misused the API (sent a message its state forbids, built a
message outside the limits). The connection's state is unchanged; fix the caller.

RemoteProtocolError: the peer sent bytes that are not a valid frame, or a valid message that
breaks the rules. The connection moves to State.ERROR and refuses further use; the caller
disconnects the peer, optionally after sending a fatal Error carrying `reason`.
"""


class ProtocolError(Exception):
    """Base of both protocol errors; `reason` is a sentence for logs and for the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """We misused the protocol; nothing was sent or changed."""


class RemoteProtocolError(ProtocolError):
    """The peer sent garbage or broke the rules; the connection is now in State.ERROR."""
