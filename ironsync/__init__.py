"""ironsync: peer-to-peer file synchronization for the computers of one LAN."""

__version__ = "0.1.0"
