using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>
/// A weight matrix [Rows = N out-features, Cols = K in-features], row-major and contiguous, in F32, BF16 or F16.
/// The kernels read it in place (usually memory-mapped checkpoint memory) and widen bf16/f16 in registers;
/// the matrix is never converted as a whole. The memory must stay valid while the matrix is used.
/// </summary>
public readonly unsafe struct WeightMatrix : IMatrixOperand
{
    public WeightMatrix(void* data, DType dtype, int rows, int cols)
    {
        if (data == null)
            throw new ArgumentNullException(nameof(data));
        if (!dtype.IsKernelFloat())
            throw new ArgumentException($"weight dtype {dtype} is not supported; the kernels read F32, BF16 or F16", nameof(dtype));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        Data = data;
        DType = dtype;
        Rows = rows;
        Cols = cols;
    }

    /// <summary>Views a checkpoint tensor of shape [N, K...] as a matrix with Rows = N and Cols = the product of the other dimensions.</summary>
    public static WeightMatrix FromTensor(in TensorData tensor)
    {
        long[] shape = tensor.Shape;
        if (shape.Length < 2)
            throw new ArgumentException(
                $"tensor '{tensor.Name}' in '{tensor.Source}' has shape {tensor.ShapeText}; a weight matrix needs at least 2 dimensions", nameof(tensor));
        if (!tensor.DType.IsKernelFloat())
            throw new ArgumentException(
                $"tensor '{tensor.Name}' in '{tensor.Source}' has dtype {tensor.DType}; a weight matrix must be F32, BF16 or F16", nameof(tensor));

        long cols = 1;
        for (int i = 1; i < shape.Length; i++)
            cols *= shape[i];
        if (shape[0] <= 0 || shape[0] > int.MaxValue || cols <= 0 || cols > int.MaxValue)
            throw new ArgumentException(
                $"tensor '{tensor.Name}' in '{tensor.Source}' has shape {tensor.ShapeText}, which does not give a non-empty matrix with int-sized dimensions", nameof(tensor));
        long needed = shape[0] * cols * tensor.DType.SizeOf();
        if (tensor.ByteLength < needed)
            throw new ArgumentException(
                $"tensor '{tensor.Name}' in '{tensor.Source}' holds {tensor.ByteLength} bytes; shape {tensor.ShapeText} as {tensor.DType} needs {needed}", nameof(tensor));
        if (tensor.Pointer == null)
            throw new ArgumentException($"tensor '{tensor.Name}' in '{tensor.Source}' has no data", nameof(tensor));

        return new WeightMatrix(tensor.Pointer, tensor.DType, (int)shape[0], (int)cols);
    }

    /// <summary>Start of row 0; row n starts <c>n * Cols * DType.SizeOf()</c> bytes further.</summary>
    public void* Data { get; }
    public DType DType { get; }
    /// <summary>N: output features.</summary>
    public int Rows { get; }
    /// <summary>K: input features.</summary>
    public int Cols { get; }

    public long StreamedBytes => (long)Rows * Cols * DType.SizeOf();

    public IReadOnlyList<MemoryRegion> StreamedRegions => [new MemoryRegion((nint)Data, StreamedBytes)];

    public void MultiplyOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap)
    {
        if (outputSoftCap > 0f) MatMul.Multiply(x, rows, this, bias, y, outputSoftCap);
        else MatMul.Multiply(x, rows, this, bias, y);
    }

    public override string ToString() => $"WeightMatrix({DType}, {Rows} x {Cols})";
}
