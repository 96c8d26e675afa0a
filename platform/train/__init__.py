"""`hidrop train`: the driver, the Ray Train worker and its hooks, resuming, turn-taking, test faults."""
