# Sourced by scripts/pipeline.sh and scripts/test.sh: run JAX under tcmalloc when it is there.
# XLA:CPU mallocs and frees every step's buffers; glibc hands large freed blocks back to the
# kernel, so each step faults in fresh pages (issue 13: ~50k faults per size-a SFT step, 400k at
# size b). tcmalloc keeps them: SFT / RM steps 1.41x / 1.43x faster at size a and 1.15x / 1.12x
# at size b, measured side by side (python -m benchmarks.bench_levers; docs/performance.md, speed levers).
# It must be preloaded before Python starts, so the scripts do it.
# RLHF_JAX_MALLOC=system keeps glibc's malloc.
if [ "${RLHF_JAX_MALLOC:-}" != "system" ]; then
  _tc=$(/sbin/ldconfig -p 2>/dev/null | grep -o '/[^ ]*libtcmalloc_minimal\.so\.4$' | head -n1 || true)
  if [ -z "$_tc" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    # Debian / Ubuntu: install it once (quietly; on failure we run with glibc's malloc).
    _apt="timeout 180 env DEBIAN_FRONTEND=noninteractive apt-get -y -qq"
    $_apt install libtcmalloc-minimal4 >/dev/null 2>&1 \
      || { $_apt update >/dev/null 2>&1 && $_apt install libtcmalloc-minimal4 >/dev/null 2>&1; } \
      || true
    unset _apt
    _tc=$(/sbin/ldconfig -p 2>/dev/null | grep -o '/[^ ]*libtcmalloc_minimal\.so\.4$' | head -n1 || true)
  fi
  if [ -n "$_tc" ]; then
    export LD_PRELOAD="$_tc${LD_PRELOAD:+:$LD_PRELOAD}"
    echo "[allocator] tcmalloc ($_tc)" >&2
  else
    echo "[allocator] glibc malloc (tcmalloc not found: apt-get install libtcmalloc-minimal4" \
         "makes CPU training steps up to 1.4x faster)" >&2
  fi
  unset _tc
fi
