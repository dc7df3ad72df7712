"""XLA settings for this process and the processes the tests start."""

# The programs under test are tiny, so compiling is most of their time. JAX's `jax_disable_most_optimizations`
# (LLVM at -O0, its expensive passes off) compiles them in about three quarters of the CPU time; the HLO passes
# are the same, and results agree with -O2 to fp32 rounding. conftest sets it for the session through its
# environment variable, which every process a test starts inherits. Being a JAX flag, not an XLA_FLAGS entry, it
# is read at each compile, so a test module whose time goes to its programs' iterations, not to compiling
# (test_scaling_fit's L-BFGS fits), can compile at XLA's default: `XLA_DEFAULT_OPTIMIZATION = True` in it.
FAST_COMPILE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
# XLA's CPU fusion emitters (MLIR) cost two to three times the compile time of its older elemental emitters on
# these programs, which run no slower without them (docs/benchmarks.md#test-suite). An XLA_FLAGS entry: it holds
# for the whole process, every test and every process a test starts.
CPU_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a CPU process with `devices` simulated devices."""
    return f"--xla_force_host_platform_device_count={devices} {CPU_FLAGS}"


def default_optimization() -> dict:
    """Extra environment for a process whose time goes to running its programs, not compiling them."""
    return {FAST_COMPILE_ENV: "0"}
