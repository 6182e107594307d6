# Benchmarks print figures (see benchmarks/README.md); none fails on a time. Most need root.
PY ?= .venv/bin/python

.PHONY: bench
bench:
	$(PY) benchmarks/kill_path.py
	$(PY) benchmarks/decision_latency.py
	$(PY) benchmarks/footprint.py
	$(PY) benchmarks/reap_curve.py
	$(PY) benchmarks/episode.py
	$(PY) benchmarks/killer_race.py
	$(PY) benchmarks/tracing_overhead.py
	$(PY) benchmarks/report_scale.py
	test ! -f benchmarks/observe_overhead.py || $(PY) benchmarks/observe_overhead.py
	$(PY) benchmarks/shape_fidelity.py

# The same scripts at their smallest size, a few seconds each: they still run (what CI checks, through
# tests/system/test_benchmarks_smoke.py). Their figures are not results.
.PHONY: bench-smoke
bench-smoke:
	$(PY) benchmarks/kill_path.py --smoke
	$(PY) benchmarks/kill_path.py --smoke --starve
	$(PY) benchmarks/decision_latency.py --smoke
	$(PY) benchmarks/footprint.py --smoke
	$(PY) benchmarks/reap_curve.py --smoke
	$(PY) benchmarks/episode.py --smoke
	$(PY) benchmarks/killer_race.py --smoke
	$(PY) benchmarks/tracing_overhead.py --smoke
	$(PY) benchmarks/report_scale.py --smoke
	$(PY) benchmarks/observe_overhead.py --smoke
	$(PY) benchmarks/shape_fidelity.py --smoke
