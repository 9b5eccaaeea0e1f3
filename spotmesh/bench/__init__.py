"""spotmesh benchmarks: each prints a table, writes JSON, and measures its baseline in the
same run."""
