using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// The rows of a <see cref="QuantizedMatrix"/>, dequantized a K block at a time straight into the packed GEMM's
/// micro-panels (so a many-row multiply never holds an fp32 copy of more than a few of its rows). It holds only
/// pointers into the matrix's storage: the caller keeps the matrix alive while the GEMM runs.
/// </summary>
internal readonly unsafe struct QuantizedRows(QuantizedMatrix matrix) : IWeightRows
{
    private readonly byte* _codes = matrix.Blocks;
    private readonly byte* _scaleData = matrix.ScaleData;
    private readonly DType _scaleType = matrix.ScaleType;
    private readonly QuantFormat _format = matrix.Format;
    private readonly int _blocksPerRow = matrix.BlocksPerRow;

    public void Widen(int row, int count, int k0, int k1, float* destination, int stride)
    {
        // k0 is a multiple of the GEMM's K block, so of both block sizes: the range starts on a block.
        int blockSize = _format.BlockSize();
        int firstBlock = k0 / blockSize;
        int wholeBlocks = (k1 - k0) / blockSize;
        int tail = k1 - k0 - wholeBlocks * blockSize;
        int blockBytes = _format.BlockBytes();
        bool vector = Avx512F.IsSupported;
        Span<float> partial = stackalloc float[64];
        for (int r = 0; r < count; r++)
        {
            long block = (long)(row + r) * _blocksPerRow + firstBlock;
            byte* codes = _codes + block * blockBytes;
            float* target = destination + (nint)r * stride;
            int b = 0;
            if (vector)
            {
                for (; b < wholeBlocks; b++)
                    Quantizer.DequantizeBlockVector512(_format, codes + b * blockBytes, Scale(block + b), target + b * blockSize);
            }
            for (; b < wholeBlocks; b++)
                Quantizer.DequantizeBlockScalar(_format, codes + b * blockBytes, Scale(block + b), new Span<float>(target + b * blockSize, blockSize));
            if (tail > 0)
            {
                // The last block of the row is zero-padded past K; only its first elements are wanted.
                Quantizer.DequantizeBlockScalar(_format, codes + b * blockBytes, Scale(block + b), partial);
                partial[..tail].CopyTo(new Span<float>(target + b * blockSize, tail));
            }
        }
    }

    // One block scale widened to fp32 (fp16 in what we write, fp32 in older checkpoints); once per 32 or 64 weights.
    private float Scale(long block) => QuantizedMatrix.ScaleValue(_scaleData, _scaleType, block);

    public void Prefetch(int row, int count, int k0, int k1)
    {
        int blockSize = _format.BlockSize();
        int firstBlock = k0 / blockSize;
        int blocks = (k1 - k0 + blockSize - 1) / blockSize;
        int blockBytes = _format.BlockBytes();
        int scaleSize = _scaleType.SizeOf();
        for (int r = 0; r < count; r++)
        {
            long block = (long)(row + r) * _blocksPerRow + firstBlock;
            byte* codes = _codes + block * blockBytes;
            PackedGemm.PrefetchLines(codes, codes + blocks * blockBytes);
            PackedGemm.PrefetchLines(_scaleData + block * scaleSize, _scaleData + (block + blocks) * scaleSize);
        }
    }
}
