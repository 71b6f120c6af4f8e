"""The recnix service: wiring (service), the sessions and their lifecycle, admission,
liveness, finalisation, the control socket's server, the chroot's socket, journals
and audit."""
