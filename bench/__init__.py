"""qmpnet's benchmarks: ``python -m bench`` (or ``make bench``) prints tables, writes JSON.

One module per measurement: :mod:`bench.plug` (plug/unplug latency per step),
:mod:`bench.versus` (against libvirt), :mod:`bench.scale` (many NICs, many VMs),
:mod:`bench.datapath` (iperf3, hot- vs cold-plugged), :mod:`bench.cost` (import time, CLI
wall and RSS). Shared pieces live in :mod:`bench.harness`, :mod:`bench.stats`,
:mod:`bench.libvirt` and :mod:`bench.machine`. Results go to ``bench/results/<name>.json``.
Nothing asserts on time; a bench that raises makes the run exit with status 1.
"""
