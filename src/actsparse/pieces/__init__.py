"""The registered pieces a config names: criteria, corrections, layer policies and backends. Their
interfaces and registries are ``base``; importing the package registers the built-in pieces."""

from actsparse.pieces import backends, corrections, criteria, policies

__all__ = ["backends", "corrections", "criteria", "policies"]
