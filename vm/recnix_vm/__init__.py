"""recnix-vm: a QEMU harness booting Debian 12 guests with recnix installed.

``image`` builds (and caches) the guest disk image, ``machine`` drives one
guest (QMP lifecycle, serial console, SSH commands), ``cli`` is ``recnix-vm``.
"""
