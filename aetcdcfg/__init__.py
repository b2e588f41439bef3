"""aetcdcfg: an asyncio etcd v3 configuration and watch client for async Python services.

Users import from here; submodules are private except ``aetcdcfg.fastapi`` and ``aetcdcfg.testing``.
"""

from ._audit import audit_log as audit_log
from ._canary import CanarySpec as CanarySpec
from ._canary import Selector as Selector
from ._diff import ConfigDiff as ConfigDiff
from ._diff import History as History
from ._diff import HistoryEntry as HistoryEntry
from ._fanout import Subscription as Subscription
from ._fleet import Fleet as Fleet
from ._fleet import InstanceView as InstanceView
from ._fleet import WaitResult as WaitResult
from ._fleet import instances as instances
from ._fleet import wait_applied as wait_applied
from ._kv import unchanged_keys as unchanged_keys
from ._records import AuditRecord as AuditRecord
from ._records import InstanceRecord as InstanceRecord
from ._report import FieldReport as FieldReport
from ._report import SettingsReport as SettingsReport
from ._report import settings_report as settings_report
from ._report import status_report as status_report
from ._rollout import Canary as Canary
from ._rollout import CanaryPlan as CanaryPlan
from ._rollout import abort_canary as abort_canary
from ._rollout import canary_status as canary_status
from ._rollout import open_canary as open_canary
from ._rollout import plan_canary as plan_canary
from ._rollout import promote_canary as promote_canary
from ._version import __version__ as __version__
from .client import EtcdClient as EtcdClient
from .errors import AetcdcfgError as AetcdcfgError
from .errors import AuthenticationFailed as AuthenticationFailed
from .errors import CanaryRefused as CanaryRefused
from .errors import ClientClosedError as ClientClosedError
from .errors import ConfigRejected as ConfigRejected
from .errors import ConfigurationError as ConfigurationError
from .errors import EtcdError as EtcdError
from .errors import EtcdUnavailable as EtcdUnavailable
from .errors import FutureRevision as FutureRevision
from .errors import HistoryReplaced as HistoryReplaced
from .errors import PermissionDenied as PermissionDenied
from .errors import RequestTooLarge as RequestTooLarge
from .errors import RevisionCompacted as RevisionCompacted
from .errors import SettingsClosed as SettingsClosed
from .errors import SubscriberLagged as SubscriberLagged
from .errors import TxnConflict as TxnConflict
from .events import Event as Event
from .events import EventType as EventType
from .events import Snapshot as Snapshot
from .live import LiveSettings as LiveSettings
from .settings import EtcdSettings as EtcdSettings
from .source import EtcdSettingsSource as EtcdSettingsSource
from .status import AppliedChange as AppliedChange
from .status import ReportStatus as ReportStatus
from .status import SettingsStatus as SettingsStatus
from .status import WatchStatus as WatchStatus

__all__ = [
    "AetcdcfgError",
    "AppliedChange",
    "AuditRecord",
    "AuthenticationFailed",
    "Canary",
    "CanaryPlan",
    "CanaryRefused",
    "CanarySpec",
    "ClientClosedError",
    "ConfigDiff",
    "ConfigRejected",
    "ConfigurationError",
    "EtcdClient",
    "EtcdError",
    "EtcdSettings",
    "EtcdSettingsSource",
    "EtcdUnavailable",
    "Event",
    "EventType",
    "FieldReport",
    "Fleet",
    "FutureRevision",
    "HistoryReplaced",
    "History",
    "HistoryEntry",
    "InstanceRecord",
    "InstanceView",
    "LiveSettings",
    "PermissionDenied",
    "ReportStatus",
    "Selector",
    "RequestTooLarge",
    "RevisionCompacted",
    "SettingsClosed",
    "SettingsReport",
    "SettingsStatus",
    "Snapshot",
    "SubscriberLagged",
    "Subscription",
    "TxnConflict",
    "WaitResult",
    "WatchStatus",
    "__version__",
    "abort_canary",
    "audit_log",
    "canary_status",
    "instances",
    "open_canary",
    "plan_canary",
    "promote_canary",
    "settings_report",
    "status_report",
    "unchanged_keys",
    "wait_applied",
]
