"""Remote builds: guard sockets for builds without their .drv here, recnix's ssh
proxy to ssh-ng:// builders, and how far a builder is trusted."""
