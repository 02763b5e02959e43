"""Fault-injection tests: real Kafka, real worker processes, faults, then an exact audit."""
