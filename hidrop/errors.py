"""The one base class of every mistake a user can fix."""


class UserError(Exception):
    """A bad config, an impossible schedule, a missing checkpoint, an unreachable store: the `hidrop` command
    prints its first line after "error:" and exits with status 2, never a traceback. Library callers catch
    it (or the subclass) like any exception. Defined here, below the platform, so `hidrop`'s own errors
    share it."""
