"""Benchmarks of the Yilian FHIR gateway: ``make bench`` / ``python -m bench.run``.

``bench.data`` builds the synthetic Chinese patients and their transaction Bundles,
``bench.wrk`` installs, runs and parses wrk (with the Lua scripts in ``bench/lua``),
``bench.run`` drives a whole run per database and prints the result tables. Figures of a
real run on the reference machine are in ``bench/RESULTS.md``.
"""
