"""aetcdcfg: an asyncio etcd v3 configuration and watch client for async Python services.

Users import from here; submodules are private except ``aetcdcfg.fastapi`` and ``aetcdcfg.testing``.
"""

from ._diff import ConfigDiff as ConfigDiff
from ._diff import History as History
from ._diff import HistoryEntry as HistoryEntry
from ._fanout import Subscription as Subscription
from ._kv import unchanged_keys as unchanged_keys
from ._report import FieldReport as FieldReport
from ._report import SettingsReport as SettingsReport
from ._report import settings_report as settings_report
from ._report import status_report as status_report
from ._version import __version__ as __version__
from .client import EtcdClient as EtcdClient
from .errors import AetcdcfgError as AetcdcfgError
from .errors import AuthenticationFailed as AuthenticationFailed
from .errors import ClientClosedError as ClientClosedError
from .errors import ConfigRejected as ConfigRejected
from .errors import ConfigurationError as ConfigurationError
from .errors import EtcdError as EtcdError
from .errors import EtcdUnavailable as EtcdUnavailable
from .errors import FutureRevision as FutureRevision
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
from .status import SettingsStatus as SettingsStatus
from .status import WatchStatus as WatchStatus

__all__ = [
    "AetcdcfgError",
    "AppliedChange",
    "AuthenticationFailed",
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
    "FutureRevision",
    "History",
    "HistoryEntry",
    "LiveSettings",
    "PermissionDenied",
    "RequestTooLarge",
    "RevisionCompacted",
    "SettingsClosed",
    "SettingsReport",
    "SettingsStatus",
    "Snapshot",
    "SubscriberLagged",
    "Subscription",
    "TxnConflict",
    "WatchStatus",
    "__version__",
    "settings_report",
    "status_report",
    "unchanged_keys",
]
