"""Runs that cannot collide, hang or lie: config checks, the workdir lock, stops, run files."""
