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
/// The safetensors writer puts all F32 tensors (the scales) before the I8/U8 codes, so every matrix is generated twice:
/// once for its scales (block absmax only) and once for its codes. Generation is cheap next to the disk write.
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
                long codeBytes = rows * blocks * f.BlockBytes(), scaleBytes = rows * blocks * sizeof(float);
                writer.Add(QuantizedCheckpoint.CodesName(t.Name, f), f == QuantFormat.Q8 ? DType.I8 : DType.U8, [rows, (long)blocks * f.BlockBytes()],
                    stream => WriteMatrix(stream, t, f, options, codes: true, onWritten, cancellationToken));
                writer.Add(QuantizedCheckpoint.ScalesName(t.Name, f), DType.F32, [rows, blocks],
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
                total += t.Shape[0] * f.BlocksPerRow(checked((int)t.Shape[1])) * (f.BlockBytes() + sizeof(float));
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
        int outBytesPerRow = codes ? blocks * blockBytes : blocks * sizeof(float);
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
                Parallel.For(0, n, parallel, () => new float[cols], (r, _, row) =>
                {
                    Widen(source.AsSpan((int)((offset + (long)r * cols) * size), cols * size), options.DType, row);
                    Span<byte> destination = target.AsSpan(r * outBytesPerRow, outBytesPerRow);
                    if (codes)
                    {
                        Span<float> scales = blocks <= 2048 ? stackalloc float[blocks] : new float[blocks];
                        Quantizer.QuantizeRow(format, row, destination, scales);
                    }
                    else
                    {
                        RowScales(format, row, MemoryMarshal.Cast<byte, float>(destination));
                    }
                    return row;
                }, static _ => { });
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

    /// <summary>The per-block scales <see cref="Quantizer.QuantizeRow"/> records, without packing codes.</summary>
    private static void RowScales(QuantFormat format, ReadOnlySpan<float> row, Span<float> scales)
    {
        int blockSize = format.BlockSize();
        for (int b = 0; b < scales.Length; b++)
        {
            int start = b * blockSize;
            float absMax = MathF.Abs(System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(row.Slice(start, Math.Min(blockSize, row.Length - start))));
            scales[b] = format == QuantFormat.Q8 ? (absMax == 0f ? 0f : absMax / 127f) : absMax;
        }
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
