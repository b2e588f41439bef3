"""Re-exports the history helpers, which now live in aetcdcfg.testing."""

from aetcdcfg.testing import Record, as_records, etcd_history

__all__ = ["Record", "as_records", "etcd_history"]
