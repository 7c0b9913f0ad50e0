"""The mechanism: builds a sandbox from a RunSpec and runs code in it.

Nothing in this package knows about gRPC, callers, policy or configuration files. It receives one immutable
RunSpec per run (see spec.py) and executes it. Code here runs in three places, and each module says which:
the daemon (prepare: compile, allocate), the launcher (fork server, attach/release: cgroups), and the child
(apply: namespaces, mounts, credentials, rlimits, seccomp - in that order - then exec).
"""
