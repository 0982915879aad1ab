"""Side-by-side benchmark of the gateway, nginx and a direct connection (``make bench``).

Not a test suite: pytest collects nothing here (no ``test_*.py`` files), and the run
takes minutes. Start it with ``python -m tests.bench.run [--quick]``.

Map of the package::

    run        command line: tool checks, the run, docs/BENCHMARKS.md
    stack      starts redis-server, the fake provider, nginx and the gateway; heartbeats
    scenarios  S1-S4 and the measurement around each load run
    load       runs wrk and the asyncio client, bounded in time
    client     asyncio load client for streams (S3) and idle streams (S4)
    upstream   the fake provider: a raw asyncio HTTP/1.1 server
    procs      child processes by PID, CPU and RSS from /proc
    profile    py-spy sampling of the gateway and the summary of its stacks
    report     result tables and the Markdown page
    targets    the performance targets with pass or miss
    tables     number formats and Markdown tables
    stats      percentile, median, ratio

Glossary:
    target     where the load goes: ``direct`` (the fake provider), ``nginx``, ``gateway``
    direct     the load generator talks to the fake provider with no proxy between
    TTFB       time from writing a request to the first body byte (the first SSE event)
    held       a stream counted open at its first event and kept open by the client
"""
