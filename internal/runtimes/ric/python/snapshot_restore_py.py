"""SnapStart runtime hooks for InvokeX's Python runtime.

The same API as AWS's snapshot_restore_py, so function code written for
Lambda SnapStart runs unchanged:

    from snapshot_restore_py import register_before_snapshot, register_after_restore

    @register_after_restore
    def reconnect():
        ...

Hooks registered during INIT run in registration order: before-snapshot
hooks once, before the environment is saved; after-restore hooks in every
environment restored from it, before its first invocation.
"""

_before = []
_after = []


def register_before_snapshot(func, *args, **kwargs):
    """Run func(*args, **kwargs) before the snapshot is taken."""
    _before.append((func, args, kwargs))
    return func


def register_after_restore(func, *args, **kwargs):
    """Run func(*args, **kwargs) in every restored environment."""
    _after.append((func, args, kwargs))
    return func


def _run(hooks):
    for func, args, kwargs in hooks:
        func(*args, **kwargs)


def run_before_snapshot():
    _run(_before)


def run_after_restore():
    _run(_after)
