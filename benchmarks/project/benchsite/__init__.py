"""The Django project every server in the benchmark runs (see ``benchmarks/README.md``)."""
