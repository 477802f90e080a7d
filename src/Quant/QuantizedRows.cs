using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// The rows of a <see cref="QuantizedMatrix"/>, dequantized a K block at a time straight into the packed GEMM's
/// micro-panels (so a many-row multiply never holds an fp32 copy of more than a few of its rows).
/// </summary>
internal readonly unsafe struct QuantizedRows(QuantizedMatrix matrix) : IWeightRows
{
    private readonly byte* _codes = matrix.Blocks;
    private readonly float* _scales = matrix.Scales;
    private readonly QuantFormat _format = matrix.Format;
    private readonly int _blocksPerRow = matrix.BlocksPerRow;

    public void Widen(int row, int count, int k0, int k1, float* destination, int stride)
    {
        // k0 is a multiple of the GEMM's K block, so of both block sizes: the range starts on a block.
        int blockSize = _format.BlockSize();
        int firstBlock = k0 / blockSize;
        int blocks = (k1 - k0 + blockSize - 1) / blockSize;
        int blockBytes = _format.BlockBytes();
        for (int r = 0; r < count; r++)
        {
            long block = (long)(row + r) * _blocksPerRow + firstBlock;
            Quantizer.DequantizeRow(_format,
                new ReadOnlySpan<byte>(_codes + block * blockBytes, blocks * blockBytes),
                new ReadOnlySpan<float>(_scales + block, blocks),
                new Span<float>(destination + (nint)r * stride, k1 - k0));
        }
    }

    public void Prefetch(int row, int count, int k0, int k1)
    {
        if (!Sse.IsSupported)
            return;
        int blockSize = _format.BlockSize();
        int firstBlock = k0 / blockSize;
        int blocks = (k1 - k0 + blockSize - 1) / blockSize;
        int blockBytes = _format.BlockBytes();
        for (int r = 0; r < count; r++)
        {
            long block = (long)(row + r) * _blocksPerRow + firstBlock;
            byte* codes = _codes + block * blockBytes;
            for (int offset = 0; offset < blocks * blockBytes; offset += 64)
                Sse.Prefetch1(codes + offset);
            Sse.Prefetch1(_scales + block);
        }
    }
}
