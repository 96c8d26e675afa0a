"""`hidrop bench`: the overhead benchmark, the per-method benchmarks, the search benchmark, the GPU check."""
