"""Process measurements shared by the benchmarks."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Reads ``VmHWM`` on Linux, which starts afresh at ``exec``; ``ru_maxrss`` would carry the
    parent's peak into a freshly spawned benchmark process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
