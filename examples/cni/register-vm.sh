#!/bin/sh
# What a VM runtime's shim runs once the sandbox's VM is up (its QMP monitor listening):
# qmpnetd then plugs every attachment CNI ADD left pending for that sandbox, and prints them.
#   register-vm.sh SANDBOX_ID QMP_SOCKET [NETNS]
set -eu
id=$1 qmp=$2 netns=${3:-}
exec qmpnet vm register --id "$id" --qmp "$qmp" ${netns:+--sandbox "$netns"}
