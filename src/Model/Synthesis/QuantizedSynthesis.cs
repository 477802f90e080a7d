using System.Buffers;
using System.Runtime.InteropServices;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Synthesis;

/// <summary>
/// Streams a synthetic checkpoint straight into the quantized layout of <see cref="QuantizedCheckpoint"/>: the random
/// weights are drawn (as <see cref="SyntheticCheckpointOptions.DType"/>, then widened) a band of rows at a time and
/// quantized on the fly, so memory stays at a few band buffers whatever the model size. The file equals, byte for byte,
/// what <see cref="QuantizedCheckpoint.Write"/> makes from the float synthetic checkpoint with the same seed.
/// </summary>
/// <remarks>
/// The safetensors writer puts all F16 tensors (the scales) before the I8/U8 codes, so every matrix is generated and
/// quantized twice: once for its scales and once for its codes. Generation is cheap next to the disk write. Scales are
/// always F16 here (the header is written before the values are drawn): a block whose scale does not fit fp16 (which
/// the synthetic distributions make vanishingly unlikely) stops the write with an error naming the tensor, where
/// <see cref="QuantizedCheckpoint.Write"/> would keep F32 scales for it.
/// </remarks>
internal static class QuantizedSynthesis
{
    // Elements per band of rows (about 8 MB of 16-bit values): big enough for parallel work, small for RSS.
    private const long BandElements = 4L << 20;

    public static long Write(IReadOnlyList<SyntheticTensor> tensors, string path, QuantFormat format, SyntheticCheckpointOptions options,
        Action<long> onWritten, CancellationToken cancellationToken)
    {
        var writer = new SafetensorsWriter(QuantizedCheckpoint.Metadata(format)) { AlignToCacheLines = true };
        long total = 0;
        foreach (var tensor in tensors.OrderBy(static t => t.Name, StringComparer.Ordinal))
        {
            var t = tensor;
            QuantFormat? target = QuantizedCheckpoint.IsEmbedding(t.Name) ? QuantFormat.Q8
                : QuantizedCheckpoint.IsLinearWeight(t.Name) && t.Shape.Length == 2 ? format : null;
            if (target is { } f)
            {
                long rows = t.Shape[0];
                int cols = checked((int)t.Shape[1]);
                int blocks = f.BlocksPerRow(cols);
                long codeBytes = rows * blocks * f.BlockBytes(), scaleBytes = rows * blocks * DType.F16.SizeOf();
                writer.Add(QuantizedCheckpoint.CodesName(t.Name, f), f == QuantFormat.Q8 ? DType.I8 : DType.U8, [rows, (long)blocks * f.BlockBytes()],
                    stream => WriteMatrix(stream, t, f, options, codes: true, onWritten, cancellationToken));
                writer.Add(QuantizedCheckpoint.ScalesName(t.Name, f), DType.F16, [rows, blocks],
                    stream => WriteMatrix(stream, t, f, options, codes: false, onWritten, cancellationToken));
                total += codeBytes + scaleBytes;
            }
            else
            {
                writer.Add(t.Name, options.DType, t.Shape, stream =>
                    SyntheticTensorData.WriteTensor(stream, options.Seed, t, options.DType, onWritten, cancellationToken));
                total += t.ByteLength(options.DType);
            }
        }
        writer.WriteTo(path);
        return total;
    }

    /// <summary>Total bytes of tensor data <see cref="Write"/> produces.</summary>
    public static long TotalBytes(IReadOnlyList<SyntheticTensor> tensors, QuantFormat format, DType dtype)
    {
        long total = 0;
        foreach (var t in tensors)
        {
            QuantFormat? target = QuantizedCheckpoint.IsEmbedding(t.Name) ? QuantFormat.Q8
                : QuantizedCheckpoint.IsLinearWeight(t.Name) && t.Shape.Length == 2 ? format : null;
            if (target is { } f)
                total += t.Shape[0] * f.BlocksPerRow(checked((int)t.Shape[1])) * (f.BlockBytes() + DType.F16.SizeOf());
            else
                total += t.ByteLength(dtype);
        }
        return total;
    }

    /// <summary>Writes either the packed codes or the scales of a [rows, cols] synthetic matrix, one band of rows at a time.</summary>
    private static void WriteMatrix(Stream output, SyntheticTensor tensor, QuantFormat format, SyntheticCheckpointOptions options, bool codes,
        Action<long> onWritten, CancellationToken cancellationToken)
    {
        long rows = tensor.Shape[0], elements = tensor.ElementCount;
        int cols = (int)tensor.Shape[1];
        int blocks = format.BlocksPerRow(cols), blockBytes = format.BlockBytes();
        int size = options.DType.SizeOf();
        ulong key = SyntheticTensorData.NameKey(tensor.Name);
        const int Chunk = SyntheticTensorData.ChunkElements;
        int bandRows = (int)Math.Clamp(BandElements / cols, 1, rows);
        // A band spans whole chunks: up to one extra chunk on each side of its rows.
        int maxChunks = (int)(((long)bandRows * cols + Chunk - 1) / Chunk) + 2;
        byte[] raw = ArrayPool<byte>.Shared.Rent(maxChunks * Chunk * size);
        int outBytesPerRow = codes ? blocks * blockBytes : blocks * DType.F16.SizeOf();
        byte[] band = ArrayPool<byte>.Shared.Rent(bandRows * outBytesPerRow);
        var parallel = new ParallelOptions { CancellationToken = cancellationToken, MaxDegreeOfParallelism = Kernels.KernelThreading.MaxThreads };
        try
        {
            for (long first = 0; first < rows; first += bandRows)
            {
                int n = (int)Math.Min(bandRows, rows - first);
                long start = first * cols, end = (first + n) * cols;
                long firstChunk = start / Chunk, endChunk = (end + Chunk - 1) / Chunk;
                Parallel.For(firstChunk, endChunk, parallel, chunk =>
                {
                    int count = (int)Math.Min(Chunk, elements - chunk * Chunk);
                    SyntheticTensorData.FillChunk(options.Seed, key, chunk, elements, tensor.Init, options.DType,
                        raw.AsSpan((int)(chunk - firstChunk) * Chunk * size, count * size));
                });
                long offset = start - firstChunk * Chunk;
                byte[] source = raw, target = band;
                int failedRow = int.MaxValue;
                Parallel.For(0, n, parallel, () => new RowScratch(cols, blocks, blockBytes), (r, _, scratch) =>
                {
                    Widen(source.AsSpan((int)((offset + (long)r * cols) * size), cols * size), options.DType, scratch.Row);
                    Span<byte> destination = target.AsSpan(r * outBytesPerRow, outBytesPerRow);
                    Span<byte> rowCodes = codes ? destination : scratch.Codes;
                    if (Quantizer.TryQuantizeRow(format, scratch.Row, rowCodes, scratch.Scales, DType.F16))
                    {
                        if (!codes)
                            Quantizer.StoreScales(scratch.Scales, destination, DType.F16);
                    }
                    else
                    {
                        // The first failing row is reported (after the loop: no AggregateException around the message).
                        int current;
                        while (r < (current = Volatile.Read(ref failedRow)) && Interlocked.CompareExchange(ref failedRow, r, current) != current) { }
                    }
                    return scratch;
                }, static _ => { });
                if (failedRow != int.MaxValue)
                    throw new InvalidDataException(
                        $"synthetic tensor '{tensor.Name}', row {first + failedRow}: a block's {format.Name()} scale is outside fp16's range " +
                        $"({Quantizer.MinHalfScale}..{Quantizer.MaxHalfScale}); synthesize the float checkpoint and run quantize, which keeps F32 scales for it");
                output.Write(band, 0, n * outBytesPerRow);
                onWritten(n * outBytesPerRow);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(raw);
            ArrayPool<byte>.Shared.Return(band);
        }
    }

    /// <summary>One worker's row buffers: the widened weights, the packed codes (scale pass only) and the scales.</summary>
    private sealed class RowScratch(int cols, int blocks, int blockBytes)
    {
        public float[] Row { get; } = new float[cols];
        public byte[] Codes { get; } = new byte[blocks * blockBytes];
        public float[] Scales { get; } = new float[blocks];
    }

    private static void Widen(ReadOnlySpan<byte> source, DType dtype, Span<float> destination)
    {
        switch (dtype)
        {
            case DType.F32:
                MemoryMarshal.Cast<byte, float>(source).CopyTo(destination);
                break;
            case DType.F16:
                System.Numerics.Tensors.TensorPrimitives.ConvertToSingle(MemoryMarshal.Cast<byte, Half>(source), destination);
                break;
            default:
                var bits = MemoryMarshal.Cast<byte, ushort>(source);
                for (int i = 0; i < bits.Length; i++) destination[i] = BitConverter.UInt32BitsToSingle((uint)bits[i] << 16);
                break;
        }
    }
}
