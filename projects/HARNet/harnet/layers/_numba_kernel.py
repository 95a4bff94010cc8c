"""A numba-compiled loop, compiled on first use and switchable off (private).

numba is an optional dependency of HARNet's CPU loops (soft-NMS, WBF): without it, or
with the loop's environment variable set to ``0``, :meth:`LazyKernel.available` is False
and the caller runs its tensor-op version.
"""

import os


class LazyKernel:
    """``numba.njit(cache=True, nogil=True)(fn)``, built on the first call of :meth:`get`
    (numba caches the machine code on disk afterwards)."""

    def __init__(self, fn, env_var: str):
        """
        Args:
            fn: the pure-Python loop (numba's nopython subset).
            env_var (str): the environment variable that turns the compiled loop off
                when ``"0"``.
        """
        self.fn, self.env_var, self._compiled = fn, env_var, None

    def get(self):
        """The compiled function; ImportError without numba."""
        if self._compiled is None:
            import numba  # optional dependency; ImportError tells the caller to fall back

            self._compiled = numba.njit(cache=True, nogil=True)(self.fn)
        return self._compiled

    def available(self) -> bool:
        """True when the compiled loop can run (numba importable and not disabled)."""
        if os.environ.get(self.env_var, "1") == "0":
            return False
        try:
            self.get()
        except ImportError:
            return False
        return True
