"""The registered pieces a config names: criteria, corrections, layer policies and backends, with
their interfaces and registries in ``base``."""
