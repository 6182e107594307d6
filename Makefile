# Benchmarks print figures (see benchmarks/README.md); none fails on a time. Most need root.
PY ?= .venv/bin/python

.PHONY: bench
bench:
	$(PY) benchmarks/kill_path.py
	$(PY) benchmarks/decision_latency.py
	$(PY) benchmarks/footprint.py
	$(PY) benchmarks/reap_curve.py
	$(PY) benchmarks/episode.py
	$(PY) benchmarks/tracing_overhead.py
	$(PY) benchmarks/report_scale.py
	test ! -f benchmarks/observe_overhead.py || $(PY) benchmarks/observe_overhead.py
