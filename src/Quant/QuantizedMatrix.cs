using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// A weight matrix [Rows = N out-features, Cols = K in-features] stored as blocks along K. Row n holds
/// <see cref="BlocksPerRow"/> blocks of <see cref="QuantFormats.BlockBytes"/> bytes starting at
/// <c>Blocks + n · BlocksPerRow · 32</c>, and <see cref="BlocksPerRow"/> scales starting at scale index <c>n · BlocksPerRow</c>
/// of <see cref="ScaleData"/>, each an fp16 or an fp32 value (<see cref="ScaleType"/>; one type per matrix).
/// Q8 block: 32 signed bytes, element i in byte i. NF4 block: 32 bytes for 64 weights, byte j holds element j in its
/// low nibble and element j + 32 in its high nibble (so one 16-byte load feeds two 16-lane vectors without shuffles).
/// The memory is either a mapped checkpoint (kept alive by the caller) or pinned arrays owned by this object.
/// </summary>
public sealed unsafe class QuantizedMatrix : IMatrixOperand
{
    // Owned storage (null when the matrix views memory owned by someone else, e.g. a mapped checkpoint).
    private readonly byte[]? _ownedBlocks;
    private readonly byte[]? _ownedScales;

    /// <summary>Views existing memory with fp32 scales; it must stay valid while the matrix is used.</summary>
    public QuantizedMatrix(QuantFormat format, int rows, int cols, byte* blocks, float* scales)
        : this(format, rows, cols, blocks, (byte*)scales, DType.F32)
    {
    }

    /// <summary>Views existing memory with fp16 scales; it must stay valid while the matrix is used.</summary>
    public QuantizedMatrix(QuantFormat format, int rows, int cols, byte* blocks, Half* scales)
        : this(format, rows, cols, blocks, (byte*)scales, DType.F16)
    {
    }

    private QuantizedMatrix(QuantFormat format, int rows, int cols, byte* blocks, byte* scales, DType scaleType)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        if (blocks == null) throw new ArgumentNullException(nameof(blocks));
        if (scales == null) throw new ArgumentNullException(nameof(scales));
        CheckScaleType(scaleType);
        Format = format;
        Rows = rows;
        Cols = cols;
        BlocksPerRow = format.BlocksPerRow(cols);
        Blocks = blocks;
        ScaleData = scales;
        ScaleType = scaleType;
    }

    private QuantizedMatrix(QuantFormat format, int rows, int cols, byte[] blocks, byte[] scales, DType scaleType)
        : this(format, rows, cols, (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(blocks)),
               (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(scales)), scaleType)
    {
        _ownedBlocks = blocks;
        _ownedScales = scales;
    }

    /// <summary>
    /// Allocates zeroed pinned storage for a rows x cols matrix with <paramref name="scaleType"/> (F16 or F32) scales
    /// (filled by <see cref="Quantizer"/>).
    /// </summary>
    public static QuantizedMatrix Allocate(QuantFormat format, int rows, int cols, DType scaleType = DType.F16)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        CheckScaleType(scaleType);
        long blocks = (long)rows * format.BlocksPerRow(cols);
        long bytes = blocks * format.BlockBytes();
        if (bytes > Array.MaxLength)
            throw new ArgumentException($"a {format.Name()} matrix of {rows} x {cols} needs {bytes} bytes, more than one array holds");
        // Pinned object heap: the pointers stay valid for the matrix's lifetime.
        return new QuantizedMatrix(format, rows, cols, GC.AllocateArray<byte>((int)bytes, pinned: true),
            GC.AllocateArray<byte>(checked((int)(blocks * scaleType.SizeOf())), pinned: true), scaleType);
    }

    private static void CheckScaleType(DType scaleType)
    {
        if (scaleType is not (DType.F16 or DType.F32))
            throw new ArgumentException($"block scales are F16 or F32, not {scaleType}", nameof(scaleType));
    }

    public QuantFormat Format { get; }
    /// <summary>N: output features.</summary>
    public int Rows { get; }
    /// <summary>K: input features (the stored rows are padded to whole blocks).</summary>
    public int Cols { get; }
    public int BlocksPerRow { get; }
    public byte* Blocks { get; }
    /// <summary>The scales of all rows, row-major, as <see cref="ScaleType"/> values.</summary>
    public byte* ScaleData { get; }
    /// <summary>F16 (what the quantizer writes when every scale fits) or F32 (older checkpoints, or a matrix with a scale outside fp16's range).</summary>
    public DType ScaleType { get; }
    /// <summary>True when the storage belongs to this object (quantized at load) rather than to a mapped file.</summary>
    public bool OwnsMemory => _ownedBlocks is not null;

    /// <summary>Bytes of packed codes (all rows).</summary>
    public long BlockByteCount => (long)Rows * BlocksPerRow * Format.BlockBytes();
    /// <summary>Number of scales (all rows).</summary>
    public long ScaleCount => (long)Rows * BlocksPerRow;
    /// <summary>Bytes of scales (all rows).</summary>
    public long ScaleByteCount => ScaleCount * ScaleType.SizeOf();
    /// <summary>Bytes a full pass over the matrix reads: codes plus scales.</summary>
    public long StreamedBytes => BlockByteCount + ScaleByteCount;
    /// <summary>The codes, then the scales.</summary>
    public IReadOnlyList<MemoryRegion> StreamedRegions => [new MemoryRegion((nint)Blocks, BlockByteCount), new MemoryRegion((nint)ScaleData, ScaleByteCount)];

    public Span<byte> RowBlocks(int row) => new(Blocks + (long)CheckRow(row) * BlocksPerRow * Format.BlockBytes(), BlocksPerRow * Format.BlockBytes());
    /// <summary>The raw <see cref="ScaleType"/> scales of <paramref name="row"/>.</summary>
    public Span<byte> RowScaleBytes(int row)
    {
        int size = ScaleType.SizeOf();
        return new(ScaleData + (long)CheckRow(row) * BlocksPerRow * size, BlocksPerRow * size);
    }
    public ReadOnlySpan<byte> AllBlocks => new(Blocks, checked((int)BlockByteCount));
    public ReadOnlySpan<byte> AllScaleBytes => new(ScaleData, checked((int)ScaleByteCount));

    /// <summary>Widens <paramref name="count"/> scales of <paramref name="row"/>, from block <paramref name="firstBlock"/>, to fp32.</summary>
    public void ReadScales(int row, int firstBlock, int count, Span<float> destination)
    {
        CheckRow(row);
        if ((uint)firstBlock > (uint)BlocksPerRow || (uint)count > (uint)(BlocksPerRow - firstBlock))
            throw new ArgumentOutOfRangeException(nameof(count), $"blocks {firstBlock}..{firstBlock + count} are outside a row of {BlocksPerRow}");
        WidenScales(ScaleData, ScaleType, (long)row * BlocksPerRow + firstBlock, destination[..count]);
    }

    /// <summary>Widens all <see cref="BlocksPerRow"/> scales of <paramref name="row"/> to fp32.</summary>
    public void ReadScales(int row, Span<float> destination) => ReadScales(row, 0, BlocksPerRow, destination);

    /// <summary>The fp32 value of one scale.</summary>
    public float Scale(int row, int block)
    {
        CheckRow(row);
        if ((uint)block >= (uint)BlocksPerRow)
            throw new ArgumentOutOfRangeException(nameof(block), block, $"a row has {BlocksPerRow} blocks");
        return ScaleValue(ScaleData, ScaleType, (long)row * BlocksPerRow + block);
    }

    /// <summary>Scale number <paramref name="index"/> (all rows, row-major) of F16 or F32 scales at <paramref name="data"/>, unchecked.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float ScaleValue(byte* data, DType type, long index) =>
        type == DType.F16 ? (float)((Half*)data)[index] : ((float*)data)[index];

    private static void WidenScales(byte* data, DType type, long first, Span<float> destination)
    {
        if (type == DType.F32)
            new ReadOnlySpan<float>((float*)data + first, destination.Length).CopyTo(destination);
        else
            TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>((Half*)data + first, destination.Length), destination);
    }

    public void MultiplyOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap) =>
        QuantMatMul.Multiply(x, rows, this, bias, y, outputSoftCap);

    /// <summary>
    /// One token by this matrix and the other q8/nf4 matrices of <paramref name="products"/> (same format and K): x coded
    /// once, every matrix's rows in one parallel batch, bit-identical to one <see cref="MultiplyOnHost"/> each. False
    /// where the products are not all such matrices or the call is not one token on the int16 one-token GEMV.
    /// </summary>
    public bool TryMultiplySameInputOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<HostProduct> products) =>
        products.Length > 0 && ReferenceEquals(products[0].Weight, this) && QuantMatMul.TryMultiplySameInput(x, rows, products, QuantMatMul.BestGemvPath);

    /// <summary>Writes the Cols dequantized weights of <paramref name="row"/> into <paramref name="destination"/>.</summary>
    public void DequantizeRow(int row, Span<float> destination)
    {
        int blocks = BlocksPerRow;
        float[]? rented = blocks > 1024 ? System.Buffers.ArrayPool<float>.Shared.Rent(blocks) : null;
        Span<float> scales = rented is null ? stackalloc float[blocks] : rented.AsSpan(0, blocks);
        ReadScales(row, scales);
        Quantizer.DequantizeRow(Format, RowBlocks(row), scales, destination[..Cols]);
        if (rented is not null) System.Buffers.ArrayPool<float>.Shared.Return(rented);
    }

    private int CheckRow(int row)
    {
        if ((uint)row >= (uint)Rows)
            throw new ArgumentOutOfRangeException(nameof(row), row, $"the matrix has {Rows} rows");
        return row;
    }

    public override string ToString() => $"QuantizedMatrix({Format.Name()}, {Rows} x {Cols}, {ScaleType.ToHeaderName()} scales)";
}
