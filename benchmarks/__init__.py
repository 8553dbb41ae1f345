"""tangopipe benchmarks: each module ``bench_*.py`` has ``run(quick) -> rows``; every
row compares tangopipe against a baseline measured in the same run."""
