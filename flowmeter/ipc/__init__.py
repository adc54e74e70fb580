"""The contracts between flowmeter's processes: every process may import them; they import nothing above them.

``schema`` (messages), ``counters`` (statistics per role), ``packets`` (the
packet row and its constants), ``batchring`` (shared memory between a
capture and its workers), ``lifecycle`` (how a stage process starts, stops
and reports) and ``logs`` (how every process writes its lines).
"""
