"""A real federation: certificates, node keys, SuperLink and SuperNode command lines, runs."""

# A device owner runs ``fedlora client`` (a supervised ``flower-supernode``), the server
# operator ``fedlora certs``, ``fedlora server``, ``fedlora register`` and ``fedlora submit``
# (their argparse side is fedlora.cli.deploy). Connections use TLS (a private CA made by
# `make_certificates`) and SuperNode authentication (ECDSA P-384 keys made by
# `make_node_key`, registered by the operator). Only the operator's token opens the
# SuperLink's Control API (`fedlora.deploy.superlink`, the launcher the SuperLink runs
# through, is not imported here: it loads Flower's SuperLink).

from fedlora.deploy.certificates import Certificates, make_certificates, make_node_key
from fedlora.deploy.commands import (
    DEFAULT_DATABASE,
    DEFAULT_NODE_PORT,
    DEFAULT_PORT,
    DEFAULT_RUNS_DIR,
    DEFAULT_STATE_DIR,
    NODE_DATA_DIR,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_PROFILE,
    NODE_REFUSED,
    NODE_STATE_DIR,
    node_config,
    node_refused,
    runtime_command,
    superexec_command,
    superlink_command,
    supernode_command,
)
from fedlora.deploy.flower_cli import (
    DEFAULT_FLWR_HOME,
    register_node,
    submit,
    unregister_node,
    write_flwr_home,
)
from fedlora.deploy.operator_token import (
    DEFAULT_OPERATOR_TOKEN,
    OPERATOR_TOKEN,
    ensure_operator_token,
    read_operator_token,
    write_operator_credentials,
)
from fedlora.deploy.supervisor import companion, supervise

__all__ = [
    "DEFAULT_DATABASE",
    "DEFAULT_FLWR_HOME",
    "DEFAULT_NODE_PORT",
    "DEFAULT_OPERATOR_TOKEN",
    "DEFAULT_PORT",
    "DEFAULT_RUNS_DIR",
    "DEFAULT_STATE_DIR",
    "NODE_DATA_DIR",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "NODE_PROFILE",
    "NODE_REFUSED",
    "NODE_STATE_DIR",
    "OPERATOR_TOKEN",
    "Certificates",
    "companion",
    "ensure_operator_token",
    "make_certificates",
    "make_node_key",
    "node_config",
    "node_refused",
    "read_operator_token",
    "register_node",
    "runtime_command",
    "submit",
    "superexec_command",
    "superlink_command",
    "supernode_command",
    "supervise",
    "unregister_node",
    "write_flwr_home",
    "write_operator_credentials",
]
