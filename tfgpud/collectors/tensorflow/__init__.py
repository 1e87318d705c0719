"""Collector ``tensorflow``: probe each configured Python env in a child process.

TensorFlow is never imported here. :func:`~.launch.probe_env` runs ``child/tfprobe.py`` with the
env's own interpreter through :mod:`tfgpud.runner` (as the user :mod:`.safety` allows) and
:mod:`.report` turns whatever happens — a report, a missing interpreter, an import error, a
crash, a hang, garbage — into a :class:`TfProbeResult`. :class:`~.scheduler.TfProbeScheduler`
decides when each env is probed and runs probes on worker threads, so a probe never delays the
poll loop or a scrape.
"""

from tfgpud.collectors.tensorflow.launch import PROBE_SCRIPT, probe_env, probe_environment
from tfgpud.collectors.tensorflow.report import meaningful_log_lines, parse_probe_run
from tfgpud.collectors.tensorflow.scheduler import TfProbeScheduler

__all__ = [
    "PROBE_SCRIPT",
    "TfProbeScheduler",
    "meaningful_log_lines",
    "parse_probe_run",
    "probe_env",
    "probe_environment",
]
