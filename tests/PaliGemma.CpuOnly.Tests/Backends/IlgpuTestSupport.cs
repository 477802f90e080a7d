using PaliGemma.CpuOnly.Backends.ILGPU;
using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.CpuOnly.Tests.Backends;

/// <summary>One ILGPU CPU-simulator backend shared by every ILGPU test (compiling the kernels is most of the cost).</summary>
public sealed class IlgpuFixture : IDisposable
{
    // The simulator runs each thread of a group as an OS thread and a barrier costs ~0.1 ms, so the groups are small:
    // 4 lanes still take every reduction, tile and key-tile loop through several iterations (GEMM tiles of 2 x 2
    // threads computing 16 x 16 outputs).
    public IlgpuBackend Backend { get; } = IlgpuBackend.CreateCpuSimulator(threadsPerWarp: 4, warpsPerGroup: 1);

    public void Dispose() => Backend.Dispose();
}

// One collection: the backend serves one thread at a time, so its tests never run in parallel.
[CollectionDefinition(nameof(IlgpuCollection))]
public sealed class IlgpuCollection : ICollectionFixture<IlgpuFixture>;

/// <summary>Buffers and resident weights of one test, released at its end.</summary>
internal sealed class DeviceScope(IComputeBackend backend) : IDisposable
{
    private readonly List<IDisposable> _owned = [];

    public IComputeBackend Backend { get; } = backend;

    /// <summary>A buffer of <paramref name="offset"/> + values + <paramref name="slack"/> floats (the extra ones set to
    /// <paramref name="fill"/>); returns the range starting at the values, slack included.</summary>
    public DeviceSpan Upload(float[] values, int offset = 0, int slack = 0, float fill = 0f)
    {
        var buffer = Backend.Allocate(offset + values.Length + slack);
        _owned.Add(buffer);
        var all = new float[buffer.Length];
        Array.Fill(all, fill);
        values.CopyTo(all, offset);
        Backend.Write(all, buffer.Span);
        return buffer.Slice(offset, values.Length + slack);
    }

    public DeviceSpan Zeros(long length)
    {
        var buffer = Backend.Allocate(length);
        _owned.Add(buffer);
        return buffer.Span;
    }

    public ResidentMatrix Resident(IMatrixOperand weight, float[] bias)
    {
        var resident = Backend.Upload(weight, bias);
        _owned.Add(resident);
        return resident;
    }

    public float[] Download(DeviceSpan span)
    {
        var values = new float[span.Length];
        Backend.Read(span, values);
        return values;
    }

    public void Dispose()
    {
        foreach (var owned in _owned)
            owned.Dispose();
    }
}
