"""The persistent compilation cache for every process of a two-process test (imported by its workers).

JAX writes persistent-cache entries from process 0 only, while each process looks up its
own key (a multi-process program's compile options name the process; process-local
programs name its devices). On a CPU "pod" of two local processes the second one thus
never finds anything and compiles every program on every run, and process 0 waits for
it at each collective: tests/test_loop_sharded.py's two-process run took 41 s, of which
~15 s were process 0 waiting, and 19 s with this.
"""


def store_every_process() -> bool:
  """Let processes other than 0 write their own entries too; False (nothing changed) where JAX's hook is gone."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache, compiler, distributed  # pylint: disable=import-outside-toplevel
  write = getattr(compiler, "_cache_write", None)
  put = getattr(compilation_cache, "put_executable_and_time", None)
  if write is None or put is None:
    return False

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if distributed.global_state.process_id == 0 or host_callbacks or not compilation_cache.is_cache_used(backend):
      return write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    if compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
      return None
    try:
      return put(cache_key, module_name, executable, backend, int(compile_time_secs))
    except Exception:  # pylint: disable=broad-except  # as JAX's own write: a cache failure is not the test's
      return None

  compiler._cache_write = cache_write  # pylint: disable=protected-access
  return True
