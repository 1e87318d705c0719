"""Collectors gather facts into frozen records; each one is wrapped by :func:`base.timed`."""
