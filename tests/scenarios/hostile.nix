# Attack builds against recnix itself (issue 19, docs/security.md "What root may touch"):
# a builder trying to make the recnix service, which runs as root, act on host objects.
# Host tier only (tests/host/test_hostile.py): each attack leaves what it saw in $out
# when it gets that far; the test then checks the host (victim paths verify, nothing
# written where it should not be, the service still serves).
#
# `attack` selects the script; `victim` is a host store path given to the build as an
# input (a directory holding `file`); `hostDir` is a host directory the attack points a
# symlink at (it must stay empty).
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? ""
, attack, victim, hostDir ? "/nonexistent" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  # Hide the sandbox socket from a namespace of the builder's own, so that recnix's
  # liveness watcher concludes the builder cannot reach its session.
  hideSocket = "mount -t tmpfs none /nix/var/nix/daemon-socket";
  # a directory to add, named with innerTag so that each run adds a new path
  mkSrc = ''
    mkdir -p "$TMPDIR/src-${innerTag}"
    echo "added by the hostile scenario ${innerTag}" > "$TMPDIR/src-${innerTag}/f"
  '';
  # nix-instantiate adding $TMPDIR/src-<tag> once "$TMPDIR/go" is written: it starts (and
  # maps its libraries) first, then waits while the store is covered
  delayedAdd = ''
    nix-instantiate --read-write-mode --eval -E "builtins.seq (builtins.readFile $TMPDIR/go) (builtins.path { path = $TMPDIR/src-${innerTag}; })" > "$TMPDIR/add.out" 2> "$TMPDIR/add.err" &
  '';
  # In a user+mount namespace of the builder's own: cover /nix/store with the victim
  # input, then let the add go on. A Nix client running as uid 0 (as here) moves into a
  # mount namespace of its own at start-up, so the store is covered in *that* one (nsenter).
  coverStoreThenAdd = ''
    mkfifo "$TMPDIR/go"
    unshare -Urm sh -c '
      ${delayedAdd}
      adder=$!
      sleep 2
      nsenter -t $adder -m mount --bind ${victim} /nix/store 2> "$TMPDIR/mount.err"
      echo $? > "$TMPDIR/mount.rc"
      (echo go > "$TMPDIR/go") 2> /dev/null  # a subshell: a reader gone early is no SIGPIPE here
      wait $adder
      echo $? > "$TMPDIR/add.rc"
    '
    mkdir "$out"
    cp "$TMPDIR"/add.* "$TMPDIR"/mount.* "$out/"
  '';
  scripts = {
    # route 1: fd N read-only on an input file, the socket hidden; recnix used to
    # reopen /proc/<pid>/fd/2 for writing as root
    fd1-file = ''
      exec unshare -Urm sh -c '${hideSocket} && exec 1< ${victim}/file && exec sleep 30'
    '';
    fd2-file = ''
      exec unshare -Urm sh -c '${hideSocket} && exec 2< ${victim}/file && exec sleep 30'
    '';
    # route 2: fd 2 the write end of a FIFO nobody reads; opening it for writing blocks
    fd2-fifo = ''
      mkfifo "$TMPDIR/fifo"
      exec unshare -Urm sh -c '
        ${hideSocket}
        cat "$TMPDIR/fifo" > /dev/null &
        exec 2> "$TMPDIR/fifo"
        kill $!
        exec sleep 30
      '
    '';
    # route 3: the first client comes from the builder's own namespace, in which the
    # victim input covers /nix/store when the add is answered
    cover-store = mkSrc + coverStoreThenAdd;
    # route 3, the namespace swapped after the first connection (from the sandbox's own)
    cover-store-after-pin = mkSrc + ''
      nix-store -q --hash ${victim} > "$TMPDIR/pin.out"
    '' + coverStoreThenAdd;
    # a symlink planted in the chroot's store at the name of the path about to be added
    plant-symlink = mkSrc + ''
      p=$(nix-instantiate --eval -E "builtins.path { path = $TMPDIR/src-${innerTag}; }")
      p=''${p#\"}; p=''${p%\"}
      ln -s ${hostDir} "$p"
      mkdir "$out"
      if nix-store --add "$TMPDIR/src-${innerTag}" > "$out/add.out" 2> "$out/add.err"; then
        echo 0 > "$out/add.rc"
      else
        echo $? > "$out/add.rc"
      fi
    '';
    # legitimate: the first client (which pins the namespace) exits before the add
    fork-exit = mkSrc + ''
      (nix-store -q --hash ${victim} > /dev/null) &
      wait
      sh -c 'nix-store --add "$TMPDIR/src-${innerTag}"' > "$TMPDIR/added"
      mkdir "$out"
      cat "$(cat "$TMPDIR/added")/f" > "$out/content"
      ln -s "$(cat "$TMPDIR/added")" "$out/added"
    '';
  };
in lib.mkBuild {
  name = "scenario-hostile-${attack}";
  features = [ feature ];
  env = { inherit tag innerTag; victimInput = builtins.storePath victim; };
  script = scripts.${attack};
}
