"""Test-session set-up: JAX's persistent compilation cache (jaxgrad.pipeline.runtime), shared by the tests
and the subprocesses they start (through the environment), so the tiny pipeline's programs are
compiled once per session rather than once per fixture, test and process. Results do not depend
on it; a fresh checkout starts with an empty cache under the system's temporary directory.

Float32 matrix products run at full float32 precision (``jax_default_matmul_precision``
"highest", also in the subprocesses): JAX's default lets a GPU use TF32 (10-bit mantissa), which
moves logits by ~1e-3 relative, ten times the references' bounds here. On a CPU it changes
nothing; users choose the precision with the same flag (README, "GPU and TPU")."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxgrad-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
