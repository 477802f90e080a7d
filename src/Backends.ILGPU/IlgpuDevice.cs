namespace PaliGemma.CpuOnly.Backends.ILGPU;

/// <summary>Which ILGPU accelerator <see cref="IlgpuBackend.Create"/> opens.</summary>
public enum IlgpuDevice
{
    /// <summary>A CUDA device if there is one, else an OpenCL device, else ILGPU's CPU accelerator.</summary>
    Auto,
    /// <summary>An NVIDIA GPU through the CUDA driver (the one with the most memory).</summary>
    Cuda,
    /// <summary>An OpenCL GPU (the one with the most memory) that ILGPU supports.</summary>
    OpenCL,
    /// <summary>ILGPU's CPU accelerator: a GPU simulator, far slower than the library's CPU backend; for tests.</summary>
    Cpu,
}

/// <summary>A device ILGPU can compute on.</summary>
/// <param name="Kind">Cuda, OpenCL or Cpu.</param>
/// <param name="Name">The device's name, e.g. "NVIDIA GeForce RTX 4090".</param>
/// <param name="MemoryBytes">Device memory in bytes.</param>
public sealed record IlgpuDeviceInfo(IlgpuDevice Kind, string Name, long MemoryBytes);
