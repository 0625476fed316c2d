"""What every layer stands on: N:M patterns and the selection op, int8 rounding, next-token
distributions, the registry of named pieces, devices, the machine, cache paths and errors."""
