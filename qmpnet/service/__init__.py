"""qmpnetd: the resident node service, and the thin client that talks to it.

One process per node owns every VM's state under its state root, keeps one QMP session per
VM (serialized per VM), hears QEMU's events as they happen and runs the watches. Clients talk
to it over a unix socket in JSON-RPC 2.0, one message per line (:mod:`.protocol`).

Layers: :mod:`.protocol` and :mod:`.client` use only the standard library (the CLI's service
mode imports nothing else); :mod:`.auth` checks a peer's credentials; :mod:`.registry` holds
the VMs and their sessions; :mod:`.methods` checks each request at the boundary and calls the
library's front door; :mod:`.server` frames requests on the socket; :mod:`.daemon` is the
``qmpnetd`` command.
"""
