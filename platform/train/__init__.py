"""`hidrop train`: `driver` (run_training), `worker` (the Ray Train worker) and its loop `hooks`, `resume`
(continuing a run from shared storage), `turns` (the overhead benchmark's turn-taking), `faults` (test faults)."""
