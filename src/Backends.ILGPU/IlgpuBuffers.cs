using ILGPU;
using ILGPU.Runtime;
using PaliGemma.CpuOnly.Backends.ILGPU.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.CpuOnly.Backends.ILGPU;

/// <summary>A float buffer in the accelerator's memory.</summary>
internal sealed class IlgpuBuffer : DeviceBuffer
{
    private MemoryBuffer1D<float, Stride1D.Dense>? _memory;

    public IlgpuBuffer(IlgpuBackend backend, MemoryBuffer1D<float, Stride1D.Dense> memory, long length) : base(backend, length)
    {
        _memory = memory;
    }

    public ArrayView1D<float, Stride1D.Dense> View(long offset, long length)
    {
        var memory = _memory ?? throw new ObjectDisposedException(nameof(IlgpuBuffer), "the device buffer was disposed");
        // ILGPU rejects a view that starts at the end of its buffer, even an empty one.
        return memory.View.SubView(length == 0 ? 0 : offset, length);
    }

    public override void Dispose()
    {
        // After the backend is gone its accelerator has already released the memory.
        if (!((IlgpuBackend)Backend).IsDisposed)
            _memory?.Dispose();
        _memory = null;
        base.Dispose();
    }
}

/// <summary>A weight matrix resident in device memory in its stored format, plus its bias.</summary>
internal abstract class IlgpuMatrix(IlgpuBackend backend, IMatrixOperand source, int biasLength, MemoryBuffer[] memory)
    : ResidentMatrix(backend, source, biasLength)
{
    private MemoryBuffer[]? _memory = memory;

    protected void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_memory is null, this);

    public abstract void Multiply(ArrayView<float> x, int rows, ArrayView<float> y, float outputSoftCap);

    public override void Dispose()
    {
        if (_memory is not null && !((IlgpuBackend)Backend).IsDisposed)
        {
            foreach (var buffer in _memory)
                buffer.Dispose();
        }
        _memory = null;
        base.Dispose();
    }
}

/// <summary>A resident matrix read by the <typeparamref name="TWeights"/> kernels.</summary>
internal sealed class IlgpuMatrix<TWeights>(IlgpuBackend backend, IMatrixOperand source, TWeights weights, ArrayView<float> bias, int biasLength, MemoryBuffer[] memory)
    : IlgpuMatrix(backend, source, biasLength, memory)
    where TWeights : struct, IDeviceWeights
{
    private readonly IlgpuBackend _backend = backend;
    private readonly TWeights _weights = weights;
    private readonly ArrayView<float> _bias = bias;
    private readonly bool _hasBias = biasLength > 0;
    private IlgpuBackend.MatMulKernelPair<TWeights>? _kernels;

    public override void Multiply(ArrayView<float> x, int rows, ArrayView<float> y, float outputSoftCap)
    {
        ThrowIfDisposed();
        _kernels ??= _backend.MatMulKernelsFor<TWeights>();
        var shape = new MatMulShape { Rows = rows, N = Rows, K = Cols, HasBias = _hasBias ? 1 : 0, SoftCap = outputSoftCap };
        if (rows <= MatMulKernels.GemvMaxRows)
            _kernels.Gemv(new KernelConfig((Rows + MatMulKernels.GemvColumns - 1) / MatMulKernels.GemvColumns, _backend.GemvGroupSize), x, _weights, _bias, y, shape);
        else
        {
            int tile = MatMulKernels.ThreadBlock * _backend.TileSide, side = _backend.TileSide;
            shape.TileKShift = MatMulKernels.GemmTileKShift(tile, Cols);
            var grid = new Index2D((Rows + tile - 1) / tile, (rows + tile - 1) / tile);
            _kernels.Gemm(new KernelConfig(grid, new Index2D(side, side)), x, _weights, _bias, y, shape);
        }
    }
}
