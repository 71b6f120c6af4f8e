"""The store seam (``seam.Store``), the real nix-daemon behind it (upstream, pool), the
restricted store every session's client talks to and its rule (policy), what becomes
of a session's paths (durability, GC roots, registration, invalidation), the host
Nix's settings, and builder-controlled work kept off the event loop (offloop)."""
