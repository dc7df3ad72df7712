"""XLA flags for this process and the processes the tests start."""

# The programs under test are tiny, so compiling is most of their time. LLVM at -O0 compiles them in about
# three quarters of the CPU time; the HLO passes are the same, and results agree with -O2 to fp32 rounding. Runs
# whose time goes to training steps rather than compiling keep the default: -O0 is slower.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a CPU process with `devices` simulated devices."""
    return f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")
