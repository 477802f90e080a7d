using System.Runtime.CompilerServices;

// The tests drive the Vector256/Vector128/scalar code paths directly through internal entry points.
[assembly: InternalsVisibleTo("PaliGemma.CpuOnly.Tests")]
// Quant's integer GEMM schedules its tiles on KernelThreading.For.
[assembly: InternalsVisibleTo("PaliGemma.CpuOnly.Quant")]
