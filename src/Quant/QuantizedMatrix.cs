using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// A weight matrix [Rows = N out-features, Cols = K in-features] stored as blocks along K. Row n holds
/// <see cref="BlocksPerRow"/> blocks of <see cref="QuantFormats.BlockBytes"/> bytes starting at
/// <c>Blocks + n · BlocksPerRow · 32</c>, and <see cref="BlocksPerRow"/> fp32 scales starting at <c>Scales + n · BlocksPerRow</c>.
/// Q8 block: 32 signed bytes, element i in byte i. NF4 block: 32 bytes for 64 weights, byte j holds element j in its
/// low nibble and element j + 32 in its high nibble (so one 16-byte load feeds two 16-lane vectors without shuffles).
/// The memory is either a mapped checkpoint (kept alive by the caller) or pinned arrays owned by this object.
/// </summary>
public sealed unsafe class QuantizedMatrix : IMatrixOperand
{
    // Owned storage (null when the matrix views memory owned by someone else, e.g. a mapped checkpoint).
    private readonly byte[]? _ownedBlocks;
    private readonly float[]? _ownedScales;

    /// <summary>Views existing memory; it must stay valid while the matrix is used.</summary>
    public QuantizedMatrix(QuantFormat format, int rows, int cols, byte* blocks, float* scales)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        if (blocks == null) throw new ArgumentNullException(nameof(blocks));
        if (scales == null) throw new ArgumentNullException(nameof(scales));
        Format = format;
        Rows = rows;
        Cols = cols;
        BlocksPerRow = format.BlocksPerRow(cols);
        Blocks = blocks;
        Scales = scales;
    }

    private QuantizedMatrix(QuantFormat format, int rows, int cols, byte[] blocks, float[] scales)
        : this(format, rows, cols, (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(blocks)),
               (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(scales)))
    {
        _ownedBlocks = blocks;
        _ownedScales = scales;
    }

    /// <summary>Allocates zeroed pinned storage for a rows x cols matrix (filled by <see cref="Quantizer"/>).</summary>
    public static QuantizedMatrix Allocate(QuantFormat format, int rows, int cols)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        long blocks = (long)rows * format.BlocksPerRow(cols);
        long bytes = blocks * format.BlockBytes();
        if (bytes > Array.MaxLength)
            throw new ArgumentException($"a {format.Name()} matrix of {rows} x {cols} needs {bytes} bytes, more than one array holds");
        // Pinned object heap: the pointers stay valid for the matrix's lifetime.
        return new QuantizedMatrix(format, rows, cols, GC.AllocateArray<byte>((int)bytes, pinned: true), GC.AllocateArray<float>((int)blocks, pinned: true));
    }

    public QuantFormat Format { get; }
    /// <summary>N: output features.</summary>
    public int Rows { get; }
    /// <summary>K: input features (the stored rows are padded to whole blocks).</summary>
    public int Cols { get; }
    public int BlocksPerRow { get; }
    public byte* Blocks { get; }
    public float* Scales { get; }
    /// <summary>True when the storage belongs to this object (quantized at load) rather than to a mapped file.</summary>
    public bool OwnsMemory => _ownedBlocks is not null;

    /// <summary>Bytes of packed codes (all rows).</summary>
    public long BlockByteCount => (long)Rows * BlocksPerRow * Format.BlockBytes();
    /// <summary>Number of scales (all rows).</summary>
    public long ScaleCount => (long)Rows * BlocksPerRow;
    /// <summary>Bytes a full pass over the matrix reads: codes plus fp32 scales.</summary>
    public long StreamedBytes => BlockByteCount + ScaleCount * sizeof(float);

    public Span<byte> RowBlocks(int row) => new(Blocks + (long)CheckRow(row) * BlocksPerRow * Format.BlockBytes(), BlocksPerRow * Format.BlockBytes());
    public Span<float> RowScales(int row) => new(Scales + (long)CheckRow(row) * BlocksPerRow, BlocksPerRow);
    public ReadOnlySpan<byte> AllBlocks => new(Blocks, checked((int)BlockByteCount));
    public ReadOnlySpan<float> AllScales => new(Scales, checked((int)ScaleCount));

    public void MultiplyOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap) =>
        QuantMatMul.Multiply(x, rows, this, bias, y, outputSoftCap);

    /// <summary>Writes the Cols dequantized weights of <paramref name="row"/> into <paramref name="destination"/>.</summary>
    public void DequantizeRow(int row, Span<float> destination) =>
        Quantizer.DequantizeRow(Format, RowBlocks(row), RowScales(row), destination[..Cols]);

    private int CheckRow(int row)
    {
        if ((uint)row >= (uint)Rows)
            throw new ArgumentOutOfRangeException(nameof(row), row, $"the matrix has {Rows} rows");
        return row;
    }

    public override string ToString() => $"QuantizedMatrix({Format.Name()}, {Rows} x {Cols})";
}
