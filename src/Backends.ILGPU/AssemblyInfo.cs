using System.Runtime.CompilerServices;

// ILGPU's CPU accelerator emits its kernel launchers into a dynamic assembly named ILGPURuntime; the kernels take this
// library's internal argument structs.
[assembly: InternalsVisibleTo("ILGPURuntime")]
// The tests create small CPU-simulator backends (fast barriers) through an internal factory.
[assembly: InternalsVisibleTo("PaliGemma.CpuOnly.Tests")]
