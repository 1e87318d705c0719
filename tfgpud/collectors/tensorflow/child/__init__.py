"""What runs inside an env's own interpreter: ``tfprobe.py``, run by path (never imported by
the daemon). This directory is ``sys.path[0]`` in that process, so it holds nothing else."""
