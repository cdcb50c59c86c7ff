"""CPU runs: put a fast memory allocator in place before torch allocates anything.

glibc's malloc serves every block above its mmap threshold with a fresh mmap and returns it with
munmap on free. A conv net's activations are such blocks, so every training step faults all of
their pages in again (about 110,000 minor faults a step for a small VGG at batch 512 on a 2-core
machine, 12% of the CPU in the kernel). The cure has to be in place before the process starts:
the process re-executes itself once, with jemalloc or tcmalloc preloaded when the library is on
the machine, else with glibc tunables that keep freed memory for reuse. Numerics are unchanged.

Written by hand because torch.backends.xeon.run_cpu, which does the same preload, is a separate
launcher with NUMA and OpenMP policies of its own and only finds unversioned library names
(Debian ships libjemalloc.so.2 in a multiarch directory).

VGGTRAIN_ALLOCATOR=auto (default) | jemalloc | tcmalloc | glibc | system (leave it alone).
A user's own LD_PRELOAD allocator, glibc.malloc tunables or MALLOC_CONF are always kept as they are.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
from collections.abc import Mapping

from vggtrain.errors import os_reason

SWITCH = "VGGTRAIN_ALLOCATOR"
APPLIED = "VGGTRAIN_ALLOCATOR_APPLIED"  # set before the re-exec: its presence means "never again"
MODES = ("auto", "jemalloc", "tcmalloc", "glibc", "system")
# Blocks up to 4 GiB come from the heap, and up to 64 GiB of free heap is kept for reuse.
GLIBC_SETTING = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
# Keep freed pages (no decay): the next step wants the same sizes again.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIBRARIES = {"jemalloc": ["libjemalloc.so.2", "libjemalloc.so"],
             "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                          "libtcmalloc.so"]}


def _library_dirs(env: Mapping[str, str]) -> list[str]:
    dirs = [f"{env[v]}/lib" for v in ("VIRTUAL_ENV", "CONDA_PREFIX") if env.get(v)]
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs += [os.path.expanduser("~/.local/lib"), "/usr/local/lib", f"/usr/lib/{multiarch}",
             f"/lib/{multiarch}", "/usr/lib", "/usr/lib64"]
    return dirs


def find_library(kind: str, env: Mapping[str, str] = os.environ) -> str | None:
    for d in _library_dirs(env):
        for name in LIBRARIES[kind]:
            matches = glob.glob(os.path.join(d, name))
            if matches:
                return matches[0]
    return None


def _users_own(env: Mapping[str, str]) -> str | None:
    preload = env.get("LD_PRELOAD", "")
    if any(k in preload for k in ("malloc", "jemalloc", "tcmalloc", "mimalloc")):
        return f"user's own (LD_PRELOAD={preload})"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return f"user's own (GLIBC_TUNABLES={env['GLIBC_TUNABLES']})"
    if env.get("MALLOC_CONF"):
        return f"user's own (MALLOC_CONF={env['MALLOC_CONF']})"
    return None


def plan(env: Mapping[str, str], system: str = sys.platform, libc: str | None = None
         ) -> tuple[str, dict[str, str]]:
    """(description, environment changes to re-execute with); no changes means stay as we are."""
    mode = env.get(SWITCH, "auto").strip().lower() or "auto"
    if mode not in MODES:
        return f"system (ignored {SWITCH}={env[SWITCH]!r}: expected one of {', '.join(MODES)})", {}
    libc = platform.libc_ver()[0] if libc is None else libc
    if mode == "system":
        return f"system ({SWITCH}=system)", {}
    if system != "linux" or libc != "glibc":
        return "system (not Linux with glibc)", {}
    own = _users_own(env)
    if own:
        return own, {}
    for kind in {"auto": ["jemalloc", "tcmalloc"], "glibc": []}.get(mode, [mode]):
        lib = find_library(kind, env)
        if lib:
            preload = ":".join(p for p in (env.get("LD_PRELOAD", ""), lib) if p)
            changes = {"LD_PRELOAD": preload}
            if kind == "jemalloc":
                changes["MALLOC_CONF"] = JEMALLOC_CONF
            what = f"{kind} ({lib}" + (f", MALLOC_CONF={JEMALLOC_CONF})" if kind == "jemalloc" else ")")
            return what, changes
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), GLIBC_SETTING) if t)
    note = f" ({mode} not found)" if mode in LIBRARIES else ""
    return f"glibc tunables ({GLIBC_SETTING}){note}", {"GLIBC_TUNABLES": tunables}


def in_effect() -> str:
    """What this process runs with, for the run log and report.json."""
    if APPLIED in os.environ:
        return os.environ[APPLIED]
    return _users_own(os.environ) or "system (not applied: vggtrain was called inside another program)"


def reexec_with_fast_allocator() -> None:
    """Re-execute this very command once with the planned allocator settings (same PID, so
    signals, exit codes and stdout/stderr are untouched). Returns when nothing is to be done."""
    if APPLIED in os.environ:
        return
    description, changes = plan(os.environ)
    os.environ[APPLIED] = description
    if not changes:
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    env = {**os.environ, **changes}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:  # should not happen; run on with the system allocator rather than fail
        os.environ[APPLIED] = f"system (re-exec failed: {os_reason(e)})"
