using System.Runtime.CompilerServices;

// The tests drive the portable GEMV next to the Vector512 one through an internal entry point.
[assembly: InternalsVisibleTo("PaliGemma.CpuOnly.Tests")]
// The benchmark names the integer GEMM paths it measures.
[assembly: InternalsVisibleTo("PaliGemma.Bench")]
