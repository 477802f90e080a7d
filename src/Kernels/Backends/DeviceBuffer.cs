namespace PaliGemma.CpuOnly.Kernels.Backends;

/// <summary>A float buffer owned by one backend (host memory for the CPU, device memory for a GPU).</summary>
public abstract class DeviceBuffer : IDisposable
{
    protected DeviceBuffer(IComputeBackend backend, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Backend = backend;
        Length = length;
    }

    public IComputeBackend Backend { get; }

    /// <summary>Floats held.</summary>
    public long Length { get; }

    public DeviceSpan Span => new(this, 0, Length);

    public DeviceSpan Slice(long offset, long length) => Span.Slice(offset, length);

    public virtual void Dispose() => GC.SuppressFinalize(this);
}

/// <summary>A range of a <see cref="DeviceBuffer"/>: what the backend operations read and write.</summary>
public readonly struct DeviceSpan
{
    public DeviceSpan(DeviceBuffer buffer, long offset, long length)
    {
        ArgumentNullException.ThrowIfNull(buffer);
        if (offset < 0 || length < 0 || offset + length > buffer.Length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range [{offset}, {offset + length}) is outside a buffer of {buffer.Length} floats");
        Buffer = buffer;
        Offset = offset;
        Length = length;
    }

    public DeviceBuffer Buffer { get; }
    public long Offset { get; }
    public long Length { get; }
    public bool IsEmpty => Length == 0;

    public DeviceSpan Slice(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset + length > Length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range [{offset}, {offset + length}) is outside a span of {Length} floats");
        return new DeviceSpan(Buffer, Offset + offset, length);
    }

    public DeviceSpan Slice(long offset) => Slice(offset, Length - offset);

    /// <summary>The floats themselves when the buffer lives in host memory; throws for device buffers.</summary>
    public Span<float> HostSpan => Buffer is HostBuffer host
        ? host.Array.AsSpan(checked((int)Offset), checked((int)Length))
        : throw new InvalidOperationException($"this buffer lives on '{Buffer.Backend.Name}', not in host memory");
}

/// <summary>A buffer in host memory: a plain float array (the CPU backend's buffers).</summary>
public sealed class HostBuffer : DeviceBuffer
{
    public HostBuffer(IComputeBackend backend, long length) : base(backend, length)
    {
        if (length > System.Array.MaxLength)
            throw new ArgumentOutOfRangeException(nameof(length), length, "a host buffer holds at most Array.MaxLength floats");
        Array = new float[length];
    }

    public float[] Array { get; }
}

/// <summary>
/// A weight matrix the CPU can multiply by, whatever its storage: <see cref="WeightMatrix"/> (f32/bf16/f16) or a
/// block-quantized matrix from the Quant library. Device backends read the storage through the concrete type.
/// </summary>
public interface IMatrixOperand
{
    /// <summary>N: output features.</summary>
    int Rows { get; }
    /// <summary>K: input features.</summary>
    int Cols { get; }
    /// <summary>Bytes one full pass over the weight reads.</summary>
    long StreamedBytes { get; }
    /// <summary>Where those bytes are: the memory one full pass reads, region by region (<see cref="StreamedBytes"/> in all).</summary>
    IReadOnlyList<MemoryRegion> StreamedRegions { get; }
    /// <summary>y[rows, N] = x·Wᵀ + bias (then cap·tanh(y/cap) when <paramref name="outputSoftCap"/> &gt; 0), on the host.</summary>
    void MultiplyOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap);

    /// <summary>
    /// Runs every product of <paramref name="products"/> (this operand is the first one's weight; all share K) on the one
    /// input x[rows, K] in one pass when this operand's kernels can, with results bit-identical to one
    /// <see cref="MultiplyOnHost"/> per product, and returns true; returns false, having written nothing, when they cannot
    /// (another storage among the weights, a row count they do not fuse). The default: false.
    /// </summary>
    bool TryMultiplySameInputOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<HostProduct> products) => false;
}

/// <summary>A weight (and bias) made resident on a backend by <see cref="IComputeBackend.Upload"/>.</summary>
public abstract class ResidentMatrix : IDisposable
{
    protected ResidentMatrix(IComputeBackend backend, IMatrixOperand source, int biasLength)
    {
        if (biasLength != 0 && biasLength != source.Rows)
            throw new ArgumentException($"a bias must be empty or hold N = {source.Rows} floats, not {biasLength}");
        Backend = backend;
        Source = source;
    }

    public IComputeBackend Backend { get; }
    /// <summary>The host weight this was made from (still valid: the CPU backend reads it in place).</summary>
    public IMatrixOperand Source { get; }
    public int Rows => Source.Rows;
    public int Cols => Source.Cols;

    public virtual void Dispose() => GC.SuppressFinalize(this);
}
