"""Measurement: FLOPs and MFU, timing windows, telemetry, metric writers, profiling."""
