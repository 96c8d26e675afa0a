"""`python -m hidrop_platform.cli`: the same as the `hidrop` command."""

from hidrop_platform.cli.app import main

main()
