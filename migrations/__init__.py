"""Numbered schema migrations: NNNN_name.sql produces schema version NNNN."""
