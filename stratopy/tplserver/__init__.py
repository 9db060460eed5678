"""The template server: one resident process per template that keeps a pool
of restored, paused clones and hands one out per request (docs/cli.md,
"stratopy-server"; docs/performance.md, "Template server").

- ``wire``: JSON lines with fds (SCM_RIGHTS) on unix stream sockets;
- ``request``: a clone request, checked against the template (pure);
- ``member``: a pool member, the forked child that becomes the clone;
- ``server``: the resident process and its pool;
- ``client``: ``stratopy-clone``, the request from a command line.
"""
